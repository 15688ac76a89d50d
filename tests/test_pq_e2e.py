"""Suite 3 (X25519 + ML-KEM-768) through the real broker, gateway and agents: a mixed fleet of suite-1 and
suite-3 devices loses nothing, and a suite-3 device's own key sealing suite 1 (a downgraded agent) is
refused as `downgrade`, counted and logged, while its correct agent keeps being accepted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.ledger import running_system

pytestmark = pytest.mark.slow  # whole-path processes

CLASSIC = "dev-x1"
HYBRID = "dev-pq1"
WINDOWS = 150
SPEED = 4.0  # 50 windows/s


def test_mixed_fleet_loses_nothing_and_a_downgrade_is_refused(tmp_path: Path) -> None:
    with running_system(tmp_path, [CLASSIC], hybrid=[HYBRID]) as system:
        for device in (CLASSIC, HYBRID):
            system.start_agent(device, windows=WINDOWS, speed=SPEED)
            system.ledger.declare_produced(device, range(WINDOWS))
        system.wait_agents(120)  # each exits 0 only once every window is receipted (delete_on = receipt)
        ledger = system.finish(results_timeout=60)
        report = ledger.report()
        print(f"\nmixed fleet (suite 1 + suite 3): {report.summary()}; rejections "
              f"{ {k: v for k, v in system.rejections().items() if v} }")
        ledger.check()
        assert report.lost_total == 0
        assert system.results_for(CLASSIC) >= WINDOWS and system.results_for(HYBRID) >= WINDOWS
        for device, suite in ((CLASSIC, "x25519"), (HYBRID, "x25519-mlkem768")):
            started = [json.loads(line) for line in system.agents[device].log().splitlines()
                       if '"agent starting"' in line]
            assert started and started[0]["suite"] == suite, started
        assert system.rejections().get("downgrade", 0) == 0

        # The suite-3 device's real key and agent, configured to seal suite 1: every message refused.
        system.start_agent(HYBRID, windows=20, speed=SPEED, run=1, e2e={"suite": "x25519"},
                           outbox={"path": str(tmp_path / "downgraded-outbox.db")}, flush_timeout_s=1.0)
        system.wait_for(lambda: system.rejections().get("downgrade", 0) >= 5, 60, "downgrade refusals")
        system.agents[HYBRID].stop()
        gateway_log = system.gateway.log()
        assert "downgrade" in gateway_log and HYBRID in gateway_log, gateway_log[-2000:]
        # Nothing of the downgraded run got a result.
        epochs = {k[1] for k in system.sink.key_set() if k[0] == HYBRID}  # type: ignore[union-attr]
        assert len(epochs) == 1, epochs
