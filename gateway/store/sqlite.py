"""The embedded store: one SQLite file in WAL mode (the default; the demo and single-host installs).

Writers take the write lock up front with BEGIN IMMEDIATE and wait on `busy_timeout`, so concurrent
processes serialise instead of failing with "database is locked" half-way through. `row_locks` is False:
that one lock already covers every row a transaction reads and then writes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from gateway.store.base import SQLITE, Database, Params, Row

BUSY_TIMEOUT_MS = 30_000


@contextmanager
def transaction(conn: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
    """The one place sgw writes BEGIN/COMMIT/ROLLBACK for SQLite (the registry, the gateway's store, the
    agent's outbox): committed when the block ends, rolled back when it raises. The default takes the
    write lock up front, so a read-modify-write never interleaves with another writer. The connection
    must be in autocommit mode (isolation_level=None), so that sqlite3 issues no BEGIN of its own."""
    conn.execute(begin)
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # a failed COMMIT may already have ended it
            conn.execute("ROLLBACK")
        raise


class SqliteDatabase(Database):
    kind = SQLITE
    row_locks = False

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path
        self.where = str(path)

    @classmethod
    def connect(cls, path: Path, *, foreign_keys: bool = False) -> SqliteDatabase:
        """Raises sqlite3.DatabaseError; callers say what the file is for."""
        # isolation_level=None: we issue BEGIN ourselves, so the write lock is taken at the start.
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if foreign_keys:
            conn.execute("PRAGMA foreign_keys = ON")
        return cls(conn, path)

    def query(self, sql: str, params: Params = ()) -> list[Row]:
        return self.conn.execute(sql, params).fetchall()

    def run(self, sql: str, params: Params = ()) -> int:
        return self.conn.execute(sql, params).rowcount

    def run_many(self, sql: str, rows: Iterable[Params]) -> None:
        self.conn.executemany(sql, rows)

    def write(self) -> AbstractContextManager[None]:
        return transaction(self.conn)

    def read(self) -> AbstractContextManager[None]:
        return transaction(self.conn, "BEGIN")

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def close(self) -> None:
        self.conn.close()
