"""`sgw gateway` as a process against a real mosquitto, real sealed traffic and the real classifier.

Traffic comes from `Device`, a test publisher that seals windows with the core Sealer using a
provisioned device's e2e key and TLS certificate (what the agent does), and keeps the list of what it
sent: the (device_id, epoch, counter) idempotency keys. An observer collects every ResultBatch.
Every wait is bounded; every process started here is stopped (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from gateway.core.topics import RESULTS_TOPIC
from gateway.inference.decision import BASELINE_PREFIX
from gateway.pb import messages_pb2 as pb
from gateway.sim import FAULTS
from tests.support.cli import SGW_ARGV, run_cli
from tests.support.gateway import (
    ROOT,
    Device,
    Env,
    GatewayProc,
    Key,
    assert_one_result_per_window,
    metric,
    running_env,
)
from tests.support.mosquitto import connect, disconnect
from tests.support.provision import provision


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with running_env(tmp_path, ["dev-1", "dev-2", "dev-3", "dev-4", "dev-rev"]) as e:
        yield e


# -- tests ----------------------------------------------------------------------------------------


def test_end_to_end_every_window_gets_exactly_one_result_and_metrics_pass_promtool(env: Env) -> None:
    obs = env.observer()
    gw = env.gateway()
    devices = [env.device(d) for d in ("dev-1", "dev-2", "dev-3", "dev-4")]
    sent: set[Key] = set()
    for d in devices:
        sent.update(d.publish(150))
    assert not obs.wait_for(sent, timeout=60)
    assert assert_one_result_per_window(obs, sent) == 0
    r = obs.results()[0]
    # six class probabilities and the unknown score; label in the closed set, confidence the top probability
    assert r.model_id == "classifier" and r.backend == "cpu" and r.label and len(r.scores) == 7
    assert r.label in {*FAULTS, "unknown"} and r.confidence == pytest.approx(max(r.scores[:6]))
    assert r.published_ns >= r.received_ns > 0 and 1 <= r.batch_size <= 64

    text = gw.scrape()
    assert metric(text, "sgw_gateway_messages_total", outcome="accepted") == len(sent)
    assert metric(text, "sgw_gateway_windows_total", kind="vibration") == len(sent)
    assert metric(text, "sgw_gateway_results_total") == len(sent)
    assert metric(text, "sgw_gateway_batch_size_count", model="classifier") >= len(sent) / 64
    check = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True,
                           timeout=30, check=False)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    # SIGHUP reloads the registry (and the log settings) without stopping the service.
    before = gw.log().count("registry reloaded")
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while gw.log().count("registry reloaded") == before:
        assert time.monotonic() < deadline and gw.proc.poll() is None, gw.log()[-2000:]
        time.sleep(0.05)
    print(f"\nend to end: {len(sent)} windows, {len(sent)} results, promtool ok")


def test_real_agents_every_forwarded_window_gets_exactly_one_result(env: Env) -> None:
    """agents -> mosquitto -> gateway -> results, checked against each agent's ledger."""
    from tests.support.agent import agent_toml, read_ledger, running_agent

    obs = env.observer()
    env.gateway()
    faults = [{"at_s": 2.0, "duration_s": 6.0, "fault": "bearing"},
              {"at_s": 10.0, "duration_s": 4.0, "fault": "imbalance"}]
    ledgers: list[Path] = []
    with contextlib.ExitStack() as stack:
        agents = []
        for d in ("dev-1", "dev-2", "dev-3"):
            cfg = agent_toml(env.prov, d, env.root, source={"speed": 0.0, "faults": faults},
                             filter={"summary_interval_s": 1.0})
            ledger = env.root / f"{d}.ledger.jsonl"
            ledgers.append(ledger)
            agents.append(stack.enter_context(running_agent(
                cfg, env.root / f"{d}.agent.log", "--ledger", str(ledger), "--max-windows", "250")))
        for agent in agents:
            assert agent.wait(90) == 0, agent.log()[-2000:]
    entries = [e for path in ledgers for e in read_ledger(path)]
    forwarded = {(e["device"], e["epoch"], e["counter"]) for e in entries}
    assert len(forwarded) == len(entries) > 30
    assert not obs.wait_for(forwarded, timeout=60)
    assert assert_one_result_per_window(obs, forwarded) == 0
    seqs = {(r.device_id, r.epoch, r.counter): r.window_seq for r in obs.results()}
    assert all(seqs[(e["device"], e["epoch"], e["counter"])] == e["window_seq"] for e in entries)
    print(f"\nreal agents: {len(forwarded)} forwarded windows (ledgers), {len(forwarded)} results")


def test_a_gap_in_the_sensor_clock_is_flagged_on_the_window_and_its_result(env: Env) -> None:
    """Issue 21: a pipe-fed agent whose acquisition program skips two frames (seq 10, 11): the window
    after the hole says `gap` on the wire and its result says so too; every other result does not."""
    from tests.support.agent import agent_toml, running_agent
    from tests.test_agent_pipe import AGENT_WRITER

    obs = env.observer()
    env.gateway()
    fifo = env.root / "gap.fifo"
    os.mkfifo(fifo)
    writer = env.root / "writer.py"
    writer.write_text(AGENT_WRITER)
    cfg = agent_toml(env.prov, "dev-2", env.root, name="gap.toml", source={"type": "pipe", "path": str(fifo)},
                     filter={"summary_interval_s": 0.1})  # under one window: every window forwarded
    t0 = time.time_ns() - 5_000_000_000
    with running_agent(cfg, env.root / "gap-agent.log", "--heartbeat-s", "3600") as agent:
        for first in (0, 12):  # frames 0-9, then 12-21: one hole in the sample clock
            subprocess.run([sys.executable, str(writer), str(fifo), str(first), "10", str(t0)],
                           check=True, timeout=60, cwd=ROOT)
        deadline = time.monotonic() + 60
        while len([r for r in obs.results() if r.device_id == "dev-2"]) < 20:
            assert time.monotonic() < deadline and agent.proc.poll() is None, agent.log()[-2000:]
            time.sleep(0.1)
    mine = sorted((r for r in obs.results() if r.device_id == "dev-2"), key=lambda r: r.window_start_ns)
    flagged = [i for i, r in enumerate(mine) if r.gap]
    assert flagged == [10], [(r.window_start_ns - t0) // 1_000_000 for r in mine]


def test_gateway_crash_still_gives_every_window_exactly_one_result(env: Env) -> None:
    obs = env.observer()
    gw = env.gateway()
    devices = [env.device(d) for d in ("dev-1", "dev-2", "dev-3", "dev-4")]
    sent: set[Key] = set()
    stop = threading.Event()

    def traffic(d: Device) -> None:
        while not stop.is_set() and len(d.sent) < 1200:
            sent_now = d.publish(20, pace_s=0.001)
            with lock:
                sent.update(sent_now)

    lock = threading.Lock()
    threads = [threading.Thread(target=traffic, args=(d,)) for d in devices]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while len(obs.keys()) < 500 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(obs.keys()) >= 500, gw.log()[-2000:]
        gw.kill()  # mid-stream: batches in inference, pending publishes, unacked inputs
        killed_at = len(obs.keys())
        time.sleep(0.5)
        restarted = GatewayProc(gw.config, gw.metrics_port, gw.log_path)
        env.gateways.append(restarted)
        restarted.start()
    except BaseException:
        stop.set()
        raise
    finally:
        for t in threads:
            t.join(60)
    assert not obs.wait_for(sent, timeout=60), restarted.log()[-3000:]
    dups = assert_one_result_per_window(obs, sent)
    text = restarted.scrape()
    replays = metric(text, "sgw_gateway_rejections_total", reason="replay")
    print(f"\ncrash: {len(sent)} windows, results seen before the kill {killed_at}, duplicate result "
          f"deliveries {dups}, redelivered inputs rejected as replay {replays:.0f}")


def test_broker_restart_gateway_reconnects_and_loses_nothing(env: Env) -> None:
    obs = env.observer()
    gw = env.gateway()
    dev = env.device("dev-1")
    sent = set(dev.publish(100))
    assert not obs.wait_for(sent, timeout=30)
    env.broker.restart()  # SIGTERM (persistence saved) and start on the same port
    deadline = time.monotonic() + 30
    while metric(gw.scrape(), "sgw_gateway_connected") != 1.0 or metric(
            gw.scrape(), "sgw_gateway_reconnects_total") < 1:
        assert time.monotonic() < deadline, gw.log()[-2000:]
        time.sleep(0.1)
    for client in list(env.clients):
        if isinstance(client, Device):
            client.close()
        else:
            disconnect(client.client)
    env.clients.clear()
    obs = env.observer()
    dev = env.device("dev-2")
    more = set(dev.publish(100))
    assert not obs.wait_for(more, timeout=30), gw.log()[-2000:]
    assert metric(gw.scrape(), "sgw_gateway_results_total") >= len(sent) + len(more)


def test_two_gateways_split_the_load_nothing_lost_nothing_twice(env: Env) -> None:
    obs = env.observer()
    gw1 = env.gateway("gw-1")
    gw2 = env.gateway("gw-2")
    devices = [env.device(d) for d in ("dev-1", "dev-2", "dev-3", "dev-4")]
    sent: set[Key] = set()
    for _ in range(5):
        for d in devices:
            sent.update(d.publish(40))
    assert not obs.wait_for(sent, timeout=60)
    assert assert_one_result_per_window(obs, sent) == 0
    by_gateway: dict[str, int] = {}
    with obs.lock:
        for b in obs.batches:
            by_gateway[b.gateway_id] = by_gateway.get(b.gateway_id, 0) + len(b.results)
    windows = [metric(g.scrape(), "sgw_gateway_windows_total", kind="vibration") for g in (gw1, gw2)]
    print(f"\nscale-out: {len(sent)} windows, results by gateway {by_gateway}, windows metric {windows}")
    assert by_gateway.get("gw-1", 0) > 0 and by_gateway.get("gw-2", 0) > 0
    assert sum(by_gateway.values()) == len(sent)
    assert all(w > 0 for w in windows) and sum(windows) == len(sent)  # each window processed once


def test_revoked_device_is_rejected_within_a_second_while_connected(env: Env) -> None:
    gw = env.gateway()
    dev = env.device("dev-rev")
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            dev.publish(1)
            time.sleep(0.01)

    t = threading.Thread(target=traffic)
    t.start()
    try:
        deadline = time.monotonic() + 20
        while metric(gw.scrape(), "sgw_gateway_windows_total", kind="vibration") < 10:
            assert time.monotonic() < deadline, gw.log()[-2000:]
            time.sleep(0.05)
        # --no-broker: this is the gateway's own check, for when the broker step is not possible.
        rc, _out, err = run_cli(["device", "revoke", "dev-rev", "--dir", str(env.prov.home), "--no-broker"])
        revoked_at = time.monotonic()
        assert rc == 0, err
        while metric(gw.scrape(), "sgw_gateway_rejections_total", reason="revoked") < 1:
            assert time.monotonic() - revoked_at < 10, gw.log()[-2000:]
            time.sleep(0.01)
        elapsed = time.monotonic() - revoked_at
    finally:
        stop.set()
        t.join(30)
    assert dev.client.is_connected()  # still connected to the broker: the gateway refused it
    print(f"\nrevocation: first 'revoked' rejection {elapsed * 1000:.0f} ms after `sgw device revoke`")
    assert elapsed <= 1.0 + 0.25  # a functional bound of the poll design (poll_interval_s = 0.25)


def test_json_results_and_dead_letters(env: Env) -> None:
    """[results] json/deadletter: one JSON per result, metadata (never bytes) per rejection."""
    import json

    got: dict[str, list[bytes]] = {}
    lock = threading.Lock()
    client = connect(env.prov.identity("observer"), env.broker.port)
    subscribed = threading.Event()

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with lock:
            got.setdefault(msg.topic, []).append(msg.payload)

    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.subscribe([("sgw/v1/results/json/#", 1), ("sgw/v1/deadletter", 1), (RESULTS_TOPIC, 1)])
    assert subscribed.wait(10)
    try:
        env.gateway(results={"json": True, "deadletter": True})
        dev = env.device("dev-1")
        sent = dev.publish(3)
        # windows an agent with a per-device baseline sends: its distance in the score, its threshold beside
        judged = dev.publish(2, score=9.0, baseline_threshold=4.5, reason="anomaly",
                             prefilter_version=BASELINE_PREFIX + "vib-v1+ord1")
        sent += judged
        garbage = dev.client.publish(dev.topic, b"\x0a\x00not an envelope", qos=1)
        garbage.wait_for_publish(10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with lock:
                n_pb = sum(len(pb.ResultBatch.FromString(p).results) for p in got.get(RESULTS_TOPIC, []))
                if (len(got.get("sgw/v1/results/json/dev-1", [])) >= 5 and got.get("sgw/v1/deadletter")
                        and n_pb >= 5):
                    break
            time.sleep(0.05)
    finally:
        disconnect(client)
    docs = [json.loads(p) for p in got.get("sgw/v1/results/json/dev-1", [])]
    assert sorted((d["device_id"], d["epoch"], d["counter"]) for d in docs) == sorted(sent)
    # six probabilities and the unknown score; the label from the closed set
    assert all(d["model_id"] == "classifier" and len(d["scores"]) == 7 for d in docs)
    assert all(d["label"] in {*FAULTS, "unknown"} for d in docs)
    assert all(0.0 <= d["confidence"] <= 1.0 for d in docs)
    # the agent's baseline distance travels into the results; null / 0 where no baseline judged the window
    by_key = {(d["device_id"], d["epoch"], d["counter"]): d for d in docs}
    assert [by_key[k]["baseline"] for k in sent] == [None] * 3 + [{"distance": 9.0, "threshold": 4.5}] * 2
    res = {(r.device_id, r.epoch, r.counter): r
           for p in got[RESULTS_TOPIC] for r in pb.ResultBatch.FromString(p).results}
    assert [(res[k].baseline_distance, res[k].baseline_threshold) for k in sent] == [(0.0, 0.0)] * 3 + [
        (9.0, 4.5)] * 2
    (dead,) = [pb.DeadLetter.FromString(p) for p in got["sgw/v1/deadletter"]]
    assert (dead.reason, dead.claimed_device_id, dead.topic, dead.gateway_id) == (
        "malformed", "dev-1", "sgw/v1/dev/dev-1/up", "gw-1")
    assert dead.size == len(b"\x0a\x00not an envelope")


def test_systemd_notify_and_json_logs(env: Env, tmp_path: Path) -> None:
    """Type=notify: READY after start, WATCHDOG while serving, STOPPING on SIGTERM; logs one JSON per line."""
    import json
    import socket

    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    try:
        gw = env.gateway("gw-1", "--log-format", "json",
                         env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
        got: list[str] = []
        deadline = time.monotonic() + 10
        while not any("WATCHDOG=1" in m for m in got) and time.monotonic() < deadline:
            got.append(sock.recv(4096).decode())
        assert any("READY=1" in m for m in got) and any("WATCHDOG=1" in m for m in got), got
        assert gw.stop() == 0
        got = []
        with contextlib.suppress(TimeoutError):
            sock.settimeout(1)
            while True:
                got.append(sock.recv(4096).decode())
        assert any("STOPPING=1" in m for m in got), got
    finally:
        sock.close()
    ours = [ln for ln in gw.log().splitlines() if '"logger":"sgw.' in ln]
    assert ours and all(json.loads(ln)["logger"].startswith("sgw.") for ln in ours)
    assert any(json.loads(ln)["msg"] == "gateway started" for ln in ours)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda t: t.replace("[pipeline]", "[pipeline]\nbogus = 1"), "pipeline.bogus: unknown key"),
        (lambda t: t.replace("device_rate = 200.0", 'device_rate = "fast"'), "pipeline.device_rate"),
        (lambda t: t.replace('private_key_file = "gateway/e2e.key"', 'private_key_file = "nope.key"'),
         "e2e.private_key_file: file not found"),
        (lambda t: t.replace('share_group = "sgw"', 'share_group = "a/#"'), "mqtt.share_group"),
    ],
)
def test_bad_config_exits_2_naming_the_key(tmp_path: Path, edit: object, needle: str) -> None:
    prov = provision(tmp_path / "home", [])
    bad = prov.home / "bad.toml"
    bad.write_text(edit(prov.gateway_toml.read_text()))  # type: ignore[operator]
    out = subprocess.run([*SGW_ARGV, "gateway", "--config", str(bad)], capture_output=True,
                         timeout=60, cwd=ROOT, check=False, env={**os.environ, "NOTIFY_SOCKET": ""})
    assert out.returncode == 2, out.stderr.decode()
    assert needle in out.stderr.decode()
    assert out.stderr.decode().count("\n") == 1  # one line, no traceback
