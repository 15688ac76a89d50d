"""Outbox full with no broker at all: the policy holds, the drop counter says how many, RSS stays flat."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psutil
import pytest

from tests.support.agent import agent_toml, running_agent, scrape, wait_for
from tests.support.mosquitto import free_port
from tests.support.provision import provision

DEV = "dev-full"
WINDOWS = 3000
MAX_BYTES = 65536  # the minimum: about 75 sealed windows


@pytest.fixture(scope="module")
def prov(tmp_path_factory: pytest.TempPathFactory):
    # Nothing ever listens on this port: the agent can only queue.
    return provision(tmp_path_factory.mktemp("full") / "home", [DEV], broker_port=free_port())


@pytest.mark.parametrize("policy", ["drop_oldest", "refuse_newest"])
def test_outbox_full_policy_counts_and_memory_stays_flat(prov, tmp_path: Path, policy: str) -> None:
    port = free_port()
    cfg = agent_toml(prov, DEV, tmp_path, source={"speed": 0.0, "faults": [
        {"at_s": 0.0, "duration_s": 1e6, "fault": "looseness"}]},
        outbox={"max_bytes": MAX_BYTES, "policy": policy}, metrics={"port": port})
    with running_agent(cfg, tmp_path / "agent.log", "--max-windows", str(WINDOWS), "--keep-running",
                       "--flush-timeout-s", "1", "--heartbeat-s", "3600") as agent:
        seen = "sgw_agent_windows_seen_total"
        wait_for(lambda: _metric(port, seen) >= 400, 60, "400 windows", agent=agent, step=0.1)
        rss_early = psutil.Process(agent.proc.pid).memory_info().rss
        wait_for(lambda: _metric(port, seen) >= WINDOWS, 120, f"{WINDOWS} windows", agent=agent, step=0.2)
        rss_late = psutil.Process(agent.proc.pid).memory_info().rss
        m = scrape(port)
        forwarded = m['sgw_agent_windows_forwarded_total{reason="anomaly"}']
        stored = m["sgw_agent_outbox_messages"]
        full = m['sgw_agent_outbox_dropped_total{reason="full"}']
        refused = m['sgw_agent_outbox_dropped_total{reason="refused"}']
        assert m["sgw_agent_outbox_bytes"] <= MAX_BYTES
        # Every window is a fault here, but the prefilter is a model (held-out recall on looseness 99.6%):
        # a window it misses is counted as filtered. Every other window is in the outbox or counted dropped.
        filtered = m["sgw_agent_windows_filtered_total"]
        assert filtered <= WINDOWS * 0.01, f"the prefilter let {filtered} faulty windows through"
        if policy == "drop_oldest":
            assert refused == 0 and full > 0
            assert forwarded + filtered == WINDOWS
            assert forwarded == stored + full
        else:
            assert full == 0 and refused > 0
            assert forwarded == stored and stored + refused + filtered == WINDOWS
        assert agent.stop() == 0, agent.log()[-2000:]
    with sqlite3.connect(tmp_path / f"{DEV}-outbox.db") as db:
        rows = [r[0] for r in db.execute("SELECT counter FROM messages ORDER BY id")]
        total = db.execute("SELECT coalesce(sum(size), 0) FROM messages").fetchone()[0]
    assert total <= MAX_BYTES
    if policy == "drop_oldest":
        assert rows[-2] > 2000, "the newest windows must be the ones kept"
    else:
        # Counters also go to the wills of connect attempts, so "oldest" means "low", not 0..n. The last
        # row is the small DEATH status sealed at shutdown, which still fitted.
        assert rows[-2] < 500, "refuse_newest keeps the oldest"
    growth_mb = (rss_late - rss_early) / 2**20
    kept_bytes = int(m["sgw_agent_outbox_bytes"])
    print(f"\n{policy}: {WINDOWS} anomalous windows, {int(stored)} kept ({kept_bytes} B), "
          f"dropped full={int(full)} refused={int(refused)}; RSS {rss_early / 2**20:.1f} -> "
          f"{rss_late / 2**20:.1f} MiB")
    assert growth_mb < 16, f"RSS grew {growth_mb:.1f} MiB while the outbox was full"


def _metric(port: int, name: str) -> float:
    try:
        return scrape(port).get(name, 0.0)
    except OSError:
        return 0.0
