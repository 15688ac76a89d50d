"""The rotation grace ends when the device shows it has its new key (real mosquitto, `sgw gateway`,
`sgw agent`): after `sgw device rotate --grace 3600`, the old key is valid for an hour, but once the
agent seals with the new key the gateway retires the old one in the registry, so every instance (and
this one after a restart) refuses it from then on."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gateway.registry.store import Registry
from tests.support.cli import run_cli
from tests.support.ledger import running_system

pytestmark = pytest.mark.slow  # whole-path processes: bounded, but tens of seconds

DEV = "dev-rot"
GRACE_S = 3600


def _not_after(home: Path) -> dict[int, int | None]:
    with Registry.open(home / "registry.db") as reg:
        rec = reg.get(DEV)
        assert rec is not None
        return {k.key_id: k.not_after_ns for k in rec.keys}


def test_old_key_is_retired_once_the_agent_uses_its_new_key(tmp_path: Path) -> None:
    with running_system(tmp_path, [DEV]) as system:
        home = system.prov.home
        system.start_agent(DEV, windows=4, speed=4.0)
        system.wait_agents(60)
        system.wait_for(lambda: system.results_for(DEV) >= 4, 30, "results under key 1")
        assert _not_after(home) == {1: None}  # the first key was never rotated: nothing to retire

        rotated_at = time.time_ns()
        rc, _out, err = run_cli(["device", "rotate", DEV, "--grace", str(GRACE_S), "--dir", str(home)])
        assert rc == 0, err
        grace_end = _not_after(home)[1]
        assert grace_end is not None and grace_end >= rotated_at + GRACE_S * 10**9

        system.start_agent(DEV, windows=4, speed=4.0, run=1)  # the rewritten bundle: key 2
        system.wait_agents(60)
        system.wait_for(lambda: system.results_for(DEV) >= 8, 30, "results under key 2")
        system.wait_for(lambda: (_not_after(home)[1] or grace_end) < grace_end, 10, "the old key retired")
        retired = _not_after(home)
        assert retired[2] is None
        assert retired[1] is not None and rotated_at <= retired[1] <= time.time_ns()
        assert system.gateway.log().count("rotation grace ended") == 1  # one registry write
