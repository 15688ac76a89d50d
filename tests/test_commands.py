"""Issue 15: `sgw device cmd` against live agents through the real broker and gateway: sealed commands,
sealed replies printed by the CLI, a device that is offline (queued by the broker, delivered when it
reconnects, or expired), and the gateway's record of replies that come after the CLI gave up."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.support.agent import scrape, start_agent
from tests.support.cli import run_cli
from tests.support.ledger import running_system
from tests.support.mosquitto import free_port

pytestmark = pytest.mark.slow  # live agents and gateway

LIVE = ("dev-c1", "dev-c2")
AWAY = "dev-c3"


def cmd(home: Path, *argv: str) -> tuple[int, list[dict[str, object]], str]:
    rc, out, err = run_cli(["device", "cmd", *argv, "--dir", str(home), "--json"])
    return rc, (json.loads(out) if out.strip() else []), err


def replies(system: object, outcome: str) -> float:
    text = system.gateway.scrape()  # type: ignore[attr-defined]
    m = re.search(rf'(?m)^sgw_gateway_command_replies_total{{outcome="{outcome}"}} (\S+)$', text)
    return float(m.group(1)) if m else 0.0


def test_commands_to_live_and_offline_devices(tmp_path: Path) -> None:
    with running_system(tmp_path, LIVE, extra=(AWAY,)) as system:
        home = system.prov.home
        ports = {d: free_port() for d in LIVE}
        for d in LIVE:
            system.start_agent(d, windows=None, speed=1.0, metrics_port=ports[d])
        system.wait_for(lambda: all(system.results_for(d) >= 5 for d in LIVE), 60, "live agents")

        rc, rows, err = cmd(home, "dev-c1", "ping")
        assert rc == 0 and [r["outcome"] for r in rows] == ["ok"], (rows, err)

        rc, rows, err = cmd(home, "dev-c1", "status")
        assert rc == 0, err
        status = rows[0]["status"]
        assert isinstance(status, dict) and int(status["windows_seen"]) > 0, rows

        rc, rows, err = cmd(home, "--all", "set-config", "--set", "filter.summary_interval_s=2",
                            "--set", "log.level=debug", "--wait", "5")
        by_device = {r["device"]: r for r in rows}
        # dev-c3 is registered and active but has never connected: no reply, so the exit code is 1.
        assert rc == 1 and set(by_device) == {*LIVE, AWAY}, (rows, err)
        assert by_device[AWAY]["outcome"] == "no_reply" and by_device[AWAY]["never_seen"] is True
        assert by_device[AWAY]["queued_until_ms"] is None  # not claimed as queued: no broker session
        for d in LIVE:
            assert by_device[d]["outcome"] == "ok", rows
            assert by_device[d]["values"] == {"filter.summary_interval_s": "2.0", "log.level": "debug"}

        rc, rows, _err = cmd(home, "dev-c2", "set-config", "--set", "max_bytes=1")
        assert rc == 1 and rows[0]["outcome"] == "error" and "not settable" in str(rows[0]["error"])
        for d in LIVE:
            m = scrape(ports[d])
            assert m['sgw_agent_commands_total{kind="set_config",outcome="ok"}'] >= 1

        # Usage mistakes: one line, exit 2, nothing sent.
        for argv in (["dev-c1"], ["dev-c1", "dance"], ["dev-c1", "set-config"], ["--all", "dev-c1", "ping"]):
            rc, rows, err = cmd(home, *argv)
            assert rc == 2 and rows == [] and err.count("\n") == 1, (argv, err)

        # Offline: the device has a session at the broker (it connected once), so the broker keeps the
        # command until the agent comes back; the CLI says it is waiting, the gateway records the reply.
        away = system.start_agent(AWAY, windows=None, speed=1.0)
        system.wait_for(lambda: system.results_for(AWAY) >= 3, 60, "dev-c3 once")
        away.stop()
        before_ok, before_expired = replies(system, "ok"), replies(system, "expired")
        rc, rows, _err = cmd(home, AWAY, "ping", "--wait", "1")
        assert rc == 1 and rows[0]["outcome"] == "no_reply" and rows[0]["queued_until_ms"], rows
        assert rows[0]["never_seen"] is False
        rc, rows, _err = cmd(home, AWAY, "ping", "--wait", "1", "--expires", "1")
        assert rows[0]["outcome"] == "no_reply"
        time.sleep(1.5)  # the second one expires while the device is away
        system.start_agent(AWAY, windows=None, speed=1.0, run=1)
        deadline = time.monotonic() + 30
        while replies(system, "ok") < before_ok + 1 or replies(system, "expired") < before_expired + 1:
            assert time.monotonic() < deadline, system.gateway.log()[-2000:]
            time.sleep(0.2)
        assert "command reply" in system.gateway.log()


def test_rotate_key_started_on_the_device(tmp_path: Path) -> None:
    """`rotate-key`: the device makes both new keys, only public halves travel (sealed), the home's CA
    certifies the request, the agent installs and restarts, and comes back on the new TLS certificate
    and e2e key, which the broker and the gateway accept. The home keeps no private key of the device."""
    from cryptography import x509

    from gateway.agent.rotation import COMMIT_RECORD, PENDING_E2E, PENDING_TLS
    from gateway.agent.service import EXIT_RESTART

    dev = "dev-r1"
    with running_system(tmp_path, (dev,)) as system:
        home = system.prov.home
        on_device = tmp_path / "on-device" / dev  # installed elsewhere, as on a real board
        shutil.copytree(system.prov.bundle(dev), on_device)
        before = {n: (on_device / n).read_bytes() for n in ("device.key", "device.crt", "e2e.key")}
        agent = system.start_agent(dev, windows=None, speed=1.0, bundle=on_device)
        system.wait_for(lambda: system.results_for(dev) >= 3, 60, "agent before rotation")

        rc, rows, err = cmd(home, dev, "rotate-key", "--wait", "20", "--grace", "600")
        assert rc == 0 and rows[0]["outcome"] == "ok", (rows, err, agent.log()[-3000:])
        assert rows[0]["values"]["key_id"] == "2", rows
        assert agent.wait(60) == EXIT_RESTART, agent.log()[-3000:]
        del system.agents[dev]  # exited as asked: not a failure for wait_for

        config = next(on_device.glob("*agent-0.toml"))
        assert "device_key_id = 2" in config.read_text()
        for name in ("device.key", "device.crt", "e2e.key"):
            assert (on_device / name).read_bytes() != before[name], name
        for name in ("device.key", "e2e.key"):
            assert (on_device / name).stat().st_mode & 0o777 == 0o600, name
        for name in (PENDING_E2E, PENDING_TLS, COMMIT_RECORD):
            assert not (on_device / name).exists(), name
        cert = x509.load_pem_x509_certificate((on_device / "device.crt").read_bytes())
        bundle = system.prov.bundle(dev)
        assert not (bundle / "device.key").exists() and not (bundle / "e2e.key").exists()
        assert (bundle / "device.crt").read_bytes() == (on_device / "device.crt").read_bytes()
        assert format(cert.serial_number, "x") == rows[0]["values"]["cert_serial"]

        # Back on the new keys (as systemd would restart it, with the same config file).
        seen = system.results_for(dev)
        again = start_agent(config, tmp_path / "agent-after-rotation.log", "--heartbeat-s", "3600")
        system.wait_for(lambda: system.results_for(dev) >= seen + 3, 60, "agent after rotation")
        rc, rows, err = cmd(home, dev, "ping", "--wait", "20")  # sealed to key 2 now
        assert rc == 0 and rows[0]["outcome"] == "ok", (rows, err)

        # Asked again: a fresh rotation to key 3 (the device's current is 2 now).
        rc, rows, err = cmd(home, dev, "rotate-key", "--wait", "20")
        assert rc == 0 and rows[0]["values"]["key_id"] == "3", (rows, err)
        assert again.wait(60) == EXIT_RESTART, again.log()[-3000:]
