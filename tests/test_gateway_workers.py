"""`[gateway] workers = N` against the real mosquitto (production identity rules: the certificate CN is the
client id): each worker connects with its own identity from `sgw gateway add-workers`, the share group
spreads telemetry over them, a SIGKILLed worker is started again by the supervisor and nothing is lost,
and SIGTERM drains every worker (exit 0)."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from gateway.pki.instances import cert_cn
from gateway.registry.ids import gateway_cn, worker_id
from tests.support.cli import run_cli
from tests.support.gateway import (
    Env,
    GatewayProc,
    assert_one_result_per_window,
    gateway_config,
    metric,
    running_env,
)
from tests.support.mosquitto import free_port

DEVICES = ("dev-a", "dev-b", "dev-c", "dev-d")


def _workers(gw: GatewayProc) -> dict[int, int]:
    """Worker index -> pid, from the supervisor's children (`--worker K` on their command lines)."""
    assert gw.proc is not None
    out = {}
    for child in psutil.Process(gw.proc.pid).children():
        try:
            cmd = child.cmdline()
        except psutil.Error:  # a killed worker not reaped yet (zombie), or gone
            continue
        if "--worker" in cmd:
            out[int(cmd[cmd.index("--worker") + 1])] = child.pid
    return out


def _connected(port: int) -> bool:
    probe = GatewayProc(Path(), port, Path())
    try:
        return metric(probe.scrape(), "sgw_gateway_connected") == 1.0
    except OSError:
        return False


def _wait(what: str, cond: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _start_two_workers(env: Env) -> GatewayProc:
    rc, out, err = run_cli(["gateway", "add-workers", "--count", "2", "--dir", str(env.prov.home), "--json"])
    assert rc == 0, err
    info = json.loads(out)
    (w2,) = info["workers"]
    assert w2["id"] == "gw-1.w2" and cert_cn(Path(w2["cert"])) == gateway_cn(worker_id("gw-1", 2))
    assert info["acl_updated"], "the broker folder's ACL lists the worker"
    env.broker.reload()
    gw = env.gateway(start=False)
    text = gw.config.read_text()
    gw.config.write_text(re.sub(r"(?m)^workers = 1\b", "workers = 2", text, count=1))
    gw.start()  # worker 1 connected (its metrics port is the configured one)
    _wait("worker 2 connected", lambda: _connected(gw.metrics_port + 1))
    return gw


@pytest.mark.timeout(240)
def test_two_workers_share_the_load_and_a_killed_worker_is_restarted(tmp_path: Path) -> None:
    with running_env(tmp_path, DEVICES) as env:
        gw = _start_two_workers(env)
        obs = env.observer()
        devices = [env.device(d) for d in DEVICES]
        first = {k for d in devices for k in d.publish(50)}
        assert not obs.wait_for(first, 60), "results of the first round"
        senders = {b.gateway_id for b in obs.batches}
        assert senders == {"gw-1", "gw-1.w2"}, f"both workers got a share: {senders}"

        before = _workers(gw)
        assert set(before) == {1, 2}, before
        # SIGKILL worker 2 while traffic flows: what it had not acked stays in its session.
        threads = [threading.Thread(target=d.publish, args=(150,), kwargs={"pace_s": 0.002}) for d in devices]
        for t in threads:
            t.start()
        time.sleep(0.3)
        psutil.Process(before[2]).kill()
        for t in threads:
            t.join(60)
        _wait("worker 2 restarted", lambda: _workers(gw).get(2, before[2]) != before[2])
        _wait("restarted worker 2 connected", lambda: _connected(gw.metrics_port + 1))
        assert _workers(gw)[1] == before[1], "worker 1 was left alone"

        sent = {k for d in devices for k in d.sent}
        assert len(sent) == 200 * len(DEVICES)
        assert not obs.wait_for(sent, 90), "every window has its result after the restart"
        assert_one_result_per_window(obs, sent)
        assert "worker exited, restarting" in gw.log()

        # SIGHUP reaches every worker (each re-reads the registry).
        assert gw.proc is not None
        before_hup = gw.log().count("registry reloaded")
        gw.proc.send_signal(signal.SIGHUP)
        _wait("both workers reloaded", lambda: gw.log().count("registry reloaded") >= before_hup + 2)
        reloaded = [ln for ln in gw.log().splitlines() if "registry reloaded" in ln][-2:]
        assert sorted(re.findall(r"worker=(\d+)", " ".join(reloaded))) == ["1", "2"], reloaded
        # running_env then SIGTERMs the supervisor: both workers drain and it exits 0.


@pytest.mark.timeout(120)
def test_workers_do_not_outlive_a_killed_supervisor(tmp_path: Path) -> None:
    with running_env(tmp_path, DEVICES[:1]) as env:
        gw = _start_two_workers(env)
        pids = _workers(gw)
        assert set(pids) == {1, 2}
        gw.kill()  # SIGKILL: no chance to forward anything; the workers get SIGTERM from the kernel
        _wait("workers gone", lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status()
                                              != psutil.STATUS_ZOMBIE for p in pids.values()))


@pytest.mark.timeout(120)
def test_a_worker_whose_config_is_refused_stops_the_service(tmp_path: Path) -> None:
    with running_env(tmp_path, DEVICES[:1]) as env:
        gw = _start_two_workers(env)
        (env.prov.home / "gateway" / "client-w2.crt").unlink()  # its restart will find no identity
        psutil.Process(_workers(gw)[2]).kill()
        assert gw.proc is not None
        assert gw.proc.wait(60) == 2, gw.log()[-2000:]  # not a restart loop: exit 2, worker 1 drained
        assert "worker refused its configuration; stopping" in gw.log()
        assert "worker stopped worker=1 how=exit 0" in gw.log()
        gw.killed = True  # its exit code was checked here


@pytest.mark.timeout(120)
def test_missing_worker_identity_is_a_one_line_error(tmp_path: Path) -> None:
    with running_env(tmp_path, DEVICES[:1]) as env:
        conf = gateway_config(env.prov, "gw-1.toml", gateway_id="gw-1", metrics_port=free_port())
        conf.write_text(re.sub(r"(?m)^workers = 1\b", "workers = 3", conf.read_text(), count=1))
        rc, out, err = run_cli(["gateway", "--config", str(conf)])
        assert rc == 2 and out == "", err
        assert err.count("\n") == 1 and "add-workers gw-1 --count 3" in err, err
