"""Issue 18's acceptance run: three gateway instances, each in its own folder with its own identity as if
on separate hosts, sharing one PostgreSQL store behind one mosquitto; 20 real agents. One instance is
SIGKILLed mid-run and restarted, another SIGSTOPped for 30 s. The agents' ledgers show lost = 0 and
duplicated results = 0, and a replayed envelope is refused by each instance it reaches.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import Device, GatewayProc, metric
from tests.support.ledger import System, gateway_toml, running_system
from tests.support.mosquitto import free_port

pytestmark = pytest.mark.slow  # 20 agents, 3 gateways, a 30 s freeze

DEVICES = [f"dev-f{i:02d}" for i in range(20)]
REPLAYER = "dev-replay"
INSTANCES = ("gw-2", "gw-3")
WINDOWS = 450  # per agent, every one forwarded: 36 s at 12.5 windows/s, 250 windows/s in all
FREEZE_S = 30.0


def _as_host(conf: Path, host: Path) -> Path:
    """The instance's config and every file it names, copied into `host` (relative paths kept): nothing
    on a shared disk but what PostgreSQL holds."""
    home = conf.parent
    doc = tomllib.loads(conf.read_text())
    for section in doc.values():
        for value in section.values() if isinstance(section, dict) else ():
            named = isinstance(value, str) and value and not Path(value).is_absolute()
            if named and (home / value).is_file():
                (host / value).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(home / value, host / value)
    shutil.copy2(conf, host / "gateway.toml")
    return host / "gateway.toml"


def _instance(system: System, gid: str, tmp: Path) -> GatewayProc:
    port = free_port()
    conf = gateway_toml(system.prov, f"{gid}-test.toml", metrics_port=port, gateway_id=gid)
    host = tmp / f"host-{gid}"
    host.mkdir()
    gw = GatewayProc(_as_host(conf, host), port, tmp / f"{gid}.log")
    system.gateways.append(gw)
    return gw.start()


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_three_instances_on_postgresql_survive_a_kill_and_a_freeze(tmp_path: Path, pg_url: str) -> None:
    with running_system(tmp_path, DEVICES, extra=(REPLAYER,), instances=INSTANCES,
                        store_url=pg_url) as system:
        gws = {"gw-1": system.gateway}
        for gid in INSTANCES:
            gws[gid] = _instance(system, gid, tmp_path)
        for dev in DEVICES:
            system.start_agent(dev, windows=WINDOWS, speed=1.0, flush_timeout_s=240.0)
            system.ledger.declare_produced(dev, range(WINDOWS))
        system.wait_for(lambda: sum(system.results_for(d) for d in DEVICES) >= 1000, 120, "first results")

        victim = gws["gw-2"]
        victim.kill()  # SIGKILL mid-run: what it received and did not commit comes again
        time.sleep(2.0)
        restarted = GatewayProc(victim.config, victim.metrics_port, victim.log_path)
        system.gateways.append(restarted)
        gws["gw-2"] = restarted.start()

        frozen = gws["gw-3"]
        assert frozen.proc is not None
        frozen.proc.send_signal(signal.SIGSTOP)  # holds its session and whatever it had in flight
        try:
            time.sleep(FREEZE_S)
        finally:
            frozen.proc.send_signal(signal.SIGCONT)
        # Frozen past the store's idle-in-transaction timeout, its session is gone: it exits (code 1) and,
        # as systemd would (Restart=on-failure), it is started again and publishes what it had committed.
        try:
            code = frozen.proc.wait(30)
        except subprocess.TimeoutExpired:
            code = None
        if code is not None:
            assert code == 1, frozen.log()[-2000:]
            frozen.killed = True  # its exit is the expected one, not a teardown failure
            again = GatewayProc(frozen.config, frozen.metrics_port, frozen.log_path)
            system.gateways.append(again)
            gws["gw-3"] = again.start()

        system.wait_agents(300)
        ledger = system.finish(results_timeout=120)
        print(f"\n3 instances on PostgreSQL, gw-2 SIGKILLed, gw-3 frozen {FREEZE_S:g} s: "
              f"{ledger.report().summary()}")
        ledger.check()

        # Replays: one device's envelopes sent again, many times over, so the shared subscription hands
        # copies to every instance; each refuses them as replays and no result is added.
        replayer = Device(system.prov, REPLAYER, system.port)
        captured: list[tuple[str, bytes]] = []
        publish = replayer.client.publish

        def record(topic: str, payload: bytes, qos: int = 0, **kw: Any) -> Any:
            captured.append((topic, payload))
            return publish(topic, payload, qos=qos, **kw)

        replayer.client.publish = record  # type: ignore[method-assign]
        keys = replayer.publish(5)
        _wait(lambda: system.sink is not None and all(k in system.sink.key_set() for k in keys), 60,
              "the replayer's results")
        before = {g: metric(gw.scrape(), "sgw_gateway_rejections_total", reason="replay")
                  for g, gw in gws.items()}
        assert system.sink is not None
        results_before = len(system.sink.key_set())
        for _ in range(12):
            for topic, payload in captured:
                publish(topic, payload, qos=1).wait_for_publish(30)

        def refused_everywhere() -> bool:
            return all(metric(gw.scrape(), "sgw_gateway_rejections_total", reason="replay") > before[g]
                       for g, gw in gws.items())

        _wait(refused_everywhere, 60, "every instance to refuse a replay")
        time.sleep(1.0)
        assert len(system.sink.key_set()) == results_before  # no window got a second, different key
        replayer.close()
