"""The outbox limit reached during a partition, through the whole path: the configured policy decides
exactly which windows go, every one that goes is counted in `sgw_agent_outbox_dropped_total`, and every
other window gets exactly one result. So the ledger's loss equals the agent's own drop count: no loss
the agent does not know about and report.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.agent import scrape
from tests.support.ledger import running_system
from tests.support.mosquitto import free_port
from tests.support.tcpproxy import TcpProxy

pytestmark = pytest.mark.slow  # whole-path processes: bounded, but tens of seconds

DEV = "dev-ob"
WINDOWS = 500
MAX_BYTES = 65536  # the smallest outbox the agent accepts: about 75 sealed windows


@pytest.mark.parametrize("policy", ["drop_oldest", "refuse_newest"])
def test_outbox_full_during_partition_drops_exactly_what_it_counts(tmp_path: Path, policy: str) -> None:
    with running_system(tmp_path, [DEV]) as system, TcpProxy(system.port) as proxy:
        port = free_port()
        agent = system.start_agent(DEV, windows=WINDOWS, speed=8.0, port=proxy.port, metrics_port=port,
                                   outbox={"max_bytes": MAX_BYTES, "policy": policy},
                                   extra_args=["--keep-running"])
        system.ledger.declare_produced(DEV, range(WINDOWS))
        system.wait_for(lambda: system.results_for(DEV) >= 50, 60, "first results")
        proxy.partition("drop")
        try:
            system.wait_for(lambda: scrape(port).get("sgw_agent_windows_seen_total", 0) >= WINDOWS, 60,
                            "the source to end while partitioned")
            m = scrape(port)
            assert m["sgw_agent_outbox_bytes"] <= MAX_BYTES
        finally:
            proxy.resume()
        system.wait_for(lambda: scrape(port).get("sgw_agent_outbox_messages", 1) == 0, 60, "outbox drained")
        system.wait_results(30, idle_s=3.0)  # drained: results follow in milliseconds
        m = scrape(port)
        full = int(m['sgw_agent_outbox_dropped_total{reason="full"}'])
        refused = int(m['sgw_agent_outbox_dropped_total{reason="refused"}'])
        assert agent.stop() == 0, agent.log()[-2000:]
        time.sleep(0.3)
        ledger = system.finish(results_timeout=10, idle_s=1.0)
        r = ledger.report()
        print(f"\noutbox full ({policy}, {MAX_BYTES} B): {r.summary()}; agent counted dropped full={full} "
              f"refused={refused} (lost windows {len(r.lost) + len(r.unforwarded)})")
        assert not r.duplicated, r.duplicated[:5]
        assert not r.unledgered, r.unledgered[:5]
        if policy == "drop_oldest":
            # Forwarded (in the ledger), then evicted from the outbox: every lost window is counted. The
            # count can be higher: it also counts evicted status messages (BIRTH), and messages that were
            # in flight when the link was cut (delivered, PUBACK lost) and were evicted before a resend.
            assert refused == 0 and full > 0 and not r.unforwarded
            assert len(r.lost) <= full, (len(r.lost), full)
            lost_seqs = {e["window_seq"] for e in ledger.forwarded
                         if (e["device"], e["epoch"], e["counter"]) in set(r.lost)}
            kept_after = [e["window_seq"] for e in ledger.forwarded if e["window_seq"] > max(lost_seqs)]
            assert kept_after, "drop_oldest must keep the newest windows"
        else:
            # Refused at the door: never in the outbox, so never in the ledger; nothing accepted is lost.
            assert full == 0 and refused > 0
            assert not r.lost and len(r.unforwarded) == refused
            assert max(s for _, s in r.unforwarded) == WINDOWS - 1, "refuse_newest refuses the newest"
