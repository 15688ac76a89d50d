"""Issue 17: the gateway's static key rotated under live agents, real mosquitto and gateway processes.

`sgw gateway rotate-key`, a gateway restart on the new config, `sgw device cmd ID update-gateway-key`
(sealed by the old key, which the devices trust): the agents install the new key, restart on it and seal
to it; messages sealed to the old key during the grace are still accepted; after `sgw gateway retire-key`
(the grace ended) they are refused as gateway_key_retired; nothing the agents forwarded is lost.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.support.agent import start_agent
from tests.support.cli import run_cli
from tests.support.gateway import Device
from tests.support.ledger import gateway_toml, running_system

pytestmark = pytest.mark.slow  # live agents and gateway

PLAIN, HYBRID, PROBE = "dev-g1", "dev-g2", "dev-g3"


def cli(home: Path, *argv: str) -> tuple[int, object, str]:
    rc, out, err = run_cli([*argv, "--dir", str(home), "--json"])
    return rc, (json.loads(out) if out.strip() else None), err


def test_gateway_key_rotation_with_live_agents(tmp_path: Path) -> None:
    from gateway.agent.service import EXIT_RESTART

    with running_system(tmp_path, (PLAIN,), hybrid=(HYBRID,), extra=(PROBE,)) as system:
        home = system.prov.home
        agents = (PLAIN, HYBRID)
        on_device = {}
        for d in agents:  # installed elsewhere, as on a real board
            on_device[d] = tmp_path / "on-device" / d
            shutil.copytree(system.prov.bundle(d), on_device[d])
            system.start_agent(d, windows=None, speed=1.0, bundle=on_device[d])
        system.wait_for(lambda: all(system.results_for(d) >= 3 for d in agents), 60, "agents on key 1")
        probe = Device(system.prov, PROBE, system.port)  # seals to gateway key 1, as a device not told yet

        rc, rotated, err = cli(home, "gateway", "rotate-key", "--grace", "3600")
        assert rc == 0 and isinstance(rotated, dict) and rotated["key_id"] == 2, err
        # The gateway restarts on the new config (as after 'systemctl restart'): both keys open.
        conf, metrics_port = system._gateway_args
        gateway_toml(system.prov, conf.name, metrics_port=metrics_port)
        system.gateway.stop()
        system.start_gateway()
        during = set(probe.publish(5))
        system.wait_for(lambda: during <= system.sink.key_set(), 60, "old-key messages in the grace")  # type: ignore[union-attr]

        for d in agents:
            rc, rows, err = cli(home, "device", "cmd", d, "update-gateway-key", "--wait", "30")
            assert rc == 0 and isinstance(rows, list) and rows[0]["outcome"] == "ok", (rows, err)
            assert rows[0]["values"] == {"gateway_key_id": "2"}
            agent = system.agents[d]
            assert agent.wait(180) == EXIT_RESTART, agent.log()[-3000:]
            config = next(on_device[d].glob("*agent-0.toml"))
            state = json.loads((tmp_path / f"{d}-outbox.db.gateway.json").read_text())
            assert state["gateway_key_id"] == 2 and state["previous"][0]["key_id"] == 1
            new_public = (home / "gateway" / "e2e.2.pub").read_bytes()
            assert (tmp_path / state["public_file"]).read_bytes() == new_public
            assert state["mlkem_file"]  # every device gets the ML-KEM half, so a suite-1 one can move up
            # Back up with the same config and ledger, as systemd would restart it.
            args = ("--ledger", str(tmp_path / f"{d}.ledger"), "--flush-timeout-s", "120",
                    "--heartbeat-s", "3600")
            again = start_agent(config, tmp_path / f"{d}-after.log", *args)
            system.agents[d] = again
            system._all_agents.append(again)
        seen = {d: system.results_for(d) for d in agents}
        system.wait_for(lambda: all(system.results_for(d) >= seen[d] + 3 for d in agents), 60,
                        "agents sealing to key 2")
        for d in agents:  # the downlink works both ways on the new key (receipts) and commands still reach
            rc, rows, err = cli(home, "device", "cmd", d, "ping", "--wait", "30")
            assert rc == 0 and rows[0]["outcome"] == "ok", (rows, err)  # type: ignore[index]
        missing = system.wait_results(60)
        assert not missing, sorted(missing)[:5]  # everything sealed to key 1 before the switch arrived

        # The grace ends (early, by the operator): key 1 is refused with its reason, counted and logged.
        rc, retired, err = cli(home, "gateway", "retire-key")
        assert rc == 0 and retired == {"retired": [1]}, err
        gateway_toml(system.prov, conf.name, metrics_port=metrics_port)
        system.gateway.stop()
        system.start_gateway()
        probe.close()
        probe = Device(system.prov, PROBE, system.port)
        after = set(probe.publish(3))
        system.wait_for(lambda: system.rejections().get("gateway_key_retired", 0) >= 3, 60,
                        "old-key messages refused after the grace")
        assert not after & system.sink.key_set()
        assert "gateway_key_retired" in system.gateway.log()
        probe.close()

        for d in agents:
            assert system.agents[d].stop(120) == 0, system.agents[d].log()[-3000:]
        ledger = system.finish(results_timeout=60)
        ledger.results = [r for r in ledger.results if r.key[0] != PROBE]  # the probe keeps no agent ledger
        ledger.check()
        report = ledger.report()
        assert report.lost_total == 0 and report.forwarded > 0, report.summary()


def test_set_suite_over_the_downlink_raises_the_minimum_only_once_confirmed(tmp_path: Path) -> None:
    """`sgw device cmd ID set-suite --suite x25519-mlkem768`: no bundle copy. The agent persists the suite
    and restarts on it; the registry's minimum moves only once a reply sealed in the new suite arrives;
    nothing sealed in the old suite before is lost (refused as downgrade) on the way."""
    import subprocess

    from gateway.agent.service import EXIT_RESTART
    from gateway.core import suites
    from gateway.registry.store import Registry
    from tests.support.cli import SGW_ARGV

    dev = "dev-s1"
    with running_system(tmp_path, (dev,)) as system:
        home = system.prov.home
        on_device = tmp_path / "on-device" / dev
        shutil.copytree(system.prov.bundle(dev), on_device)
        agent = system.start_agent(dev, windows=None, speed=1.0, bundle=on_device)
        system.wait_for(lambda: system.results_for(dev) >= 3, 60, "agent on suite 1")

        def minimum() -> int:
            with Registry.open(home / "registry.db") as registry:
                rec = registry.get(dev)
                assert rec is not None
                return rec.min_suite

        # Refused before anything is sent: an unknown suite (one line, exit 2).
        rc, _rows, err = cli(home, "device", "cmd", dev, "set-suite", "--suite", "x25519-nope")
        assert rc == 2 and "one of" in err
        cmd = subprocess.Popen(
            [*SGW_ARGV, "device", "cmd", dev, "set-suite", "--suite", "x25519-mlkem768", "--wait", "120",
             "--dir", str(home), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert agent.wait(180) == EXIT_RESTART, agent.log()[-3000:]
            assert minimum() == suites.X25519  # the device took it, but nothing sealed in it came yet
            config = next(on_device.glob("*agent-0.toml"))
            assert json.loads((tmp_path / f"{dev}-outbox.db.gateway.json").read_text())["suite"] == \
                "x25519-mlkem768"
            args = ("--ledger", str(tmp_path / f"{dev}.ledger"), "--flush-timeout-s", "120",
                    "--heartbeat-s", "3600")
            again = start_agent(config, tmp_path / f"{dev}-after.log", *args)
            system.agents[dev] = again
            system._all_agents.append(again)
            out, err = cmd.communicate(timeout=180)
        finally:
            if cmd.poll() is None:
                cmd.kill()
        rows = json.loads(out)
        assert cmd.returncode == 0 and rows[0]["outcome"] == "ok" and rows[0]["confirmed"], (rows, err)
        assert minimum() == suites.HYBRID
        seen = system.results_for(dev)
        system.wait_for(lambda: system.results_for(dev) >= seen + 3, 60, "agent on suite 3")
        assert system.rejections().get("downgrade", 0) == 0
        assert again.stop(120) == 0, again.log()[-3000:]
        ledger = system.finish(results_timeout=60)
        ledger.check()
