"""The benchmark's PostgreSQL: a throwaway durable server (tests/support/postgres.py, with PostgreSQL's own
fsync and synchronous-commit defaults, as production runs it) holding a copy of the benchmark's fleet,
and what the store did between two snapshots: commits, rows, WAL bytes (the server's CPU is sampled by
run.py's Sampler, the postmaster and its backends together).

The fleet gets there the way an operator's does: `sgw store migrate --url` and `sgw store copy --dir HOME
--to URL` from the SQLite registry the earlier phases used (with their replay windows), so the PostgreSQL
phases run the same devices, certificates and identities behind the same broker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import _broker
import psycopg

from tests.support import postgres


def missing_reason() -> str | None:
    return postgres.missing_reason()


@dataclass(frozen=True)
class Snapshot:
    commits: int
    rollbacks: int
    rows_written: int
    wal_bytes: int


class BenchPostgres:
    def __init__(self, home: _broker.Home) -> None:
        self.cluster = postgres.start_cluster(durable=True)
        try:
            self.url = self.cluster.new_database()
            self.dbname = self.url.rsplit("/", 1)[1]
            _broker.run_sgw("store", "migrate", "--url", self.url)
            _broker.run_sgw("store", "copy", "--dir", str(home.path), "--to", self.url)
            self.version = self._one("SHOW server_version")
        except BaseException:
            self.cluster.stop()
            raise

    @property
    def pid(self) -> int:
        return self.cluster.pid

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        with psycopg.connect(self.cluster.url(), autocommit=True) as conn:
            row = conn.execute(sql, params).fetchone()
        return row[0] if row else None

    def snapshot(self) -> Snapshot:
        """Counters of the benchmark's database (statistics are flushed by each backend at most once a
        second: take the closing snapshot after the instances have idled a moment)."""
        with psycopg.connect(self.cluster.url(), autocommit=True) as conn:
            conn.execute("SELECT pg_stat_clear_snapshot()")
            row = conn.execute(
                "SELECT xact_commit, xact_rollback, tup_inserted + tup_updated + tup_deleted,"
                " pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint FROM pg_stat_database"
                " WHERE datname = %s", (self.dbname,)).fetchone()
        assert row is not None
        return Snapshot(int(row[0]), int(row[1]), int(row[2]), int(row[3]))

    @staticmethod
    def cost(before: Snapshot, after: Snapshot, windows: int, seconds: float) -> dict[str, Any]:
        """What the store did per 1,000 windows and per second over the span (WAL: the whole server's)."""
        d = {"commits": after.commits - before.commits, "rollbacks": after.rollbacks - before.rollbacks,
             "rows_written": after.rows_written - before.rows_written,
             "wal_bytes": after.wal_bytes - before.wal_bytes, "windows": windows, "seconds": seconds}
        per = 1000 / windows if windows else 0.0
        d["commits_per_1000"] = d["commits"] * per
        d["wal_kb_per_1000"] = d["wal_bytes"] / 1024 * per
        d["commits_per_s"] = d["commits"] / seconds if seconds > 0 else 0.0
        d["wal_mb_per_s"] = d["wal_bytes"] / 2**20 / seconds if seconds > 0 else 0.0
        return d

    def stop(self) -> None:
        self.cluster.stop()
