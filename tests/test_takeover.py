"""A survivor publishes what a dead instance left (issue 18, "Failover"): results another instance stored in
`gateway_pending` and the broker never confirmed, once that instance's heartbeat is older than
`[gateway] takeover_after_s`. Real gateway, real mosquitto, a persistent-session result subscriber; the
dead instance's rows are written through its own ResultStore, as its last batch transaction would have.
On SQLite and on PostgreSQL.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gateway.pb import messages_pb2 as pb
from gateway.server import tier
from gateway.server.store import ResultStore
from tests.support.gateway import metric
from tests.support.ledger import running_system

pytestmark = pytest.mark.slow  # a gateway and a broker; the takeover check runs every 5 s

DEVICE = "dev-orphan"
KEYS = [(DEVICE, 77, c, 1) for c in (10, 11, 12)]


def _results() -> list[bytes]:
    return [pb.InferenceResult(device_id=dev, epoch=epoch, counter=counter, window_seq=counter,
                               model_id="classifier", label="healthy").SerializeToString()
            for dev, epoch, counter, _key_id in KEYS]


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_survivor_publishes_what_a_dead_instance_left(tmp_path: Path, kind: str,
                                                        request: pytest.FixtureRequest) -> None:
    url = str(request.getfixturevalue("pg_url")) if kind == "postgresql" else ""
    with running_system(tmp_path, [], extra=(DEVICE,), store_url=url) as system:
        where: Path | str = url or system.prov.home / "registry.db"
        now = time.time_ns()
        dead = ResultStore(where, "gw-dead")
        try:
            pending_id, keep, _ = dead.commit(KEYS, _results(), now)
            assert keep == [True] * 3 and pending_id is not None
            # It last heartbeated two minutes ago and never stopped cleanly: killed, not restarted.
            tier.register(dead.db, "gw-dead", host="gone", pid=1, version="t", now_ns=now - 120 * 10**9)
        finally:
            dead.close()
        system.wait_for(lambda: all(k[:3] in system.sink.key_set() for k in KEYS),  # type: ignore[union-attr]
                        60, "the dead instance's results at the subscriber")
        text = system.scrape()
        assert metric(text, "sgw_gateway_results_taken_over_total") == 1.0
        log = system.gateway.log_path.read_text()
        assert "took over results left unconfirmed by silent instances" in log and "gw-dead" in log
        # Confirmed by the broker, so deleted: nobody publishes them again.
        survivor = ResultStore(where, "gw-1")
        try:
            system.wait_for(lambda: not survivor.pending(), 30, "the taken-over row deleted after its PUBACK")
        finally:
            survivor.close()
