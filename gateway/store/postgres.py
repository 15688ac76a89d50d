"""The shared store: PostgreSQL through psycopg 3 and its connection pool (`[store] url`).

Each `PostgresDatabase` owns a small pool. A statement outside a transaction borrows a connection for
that statement (autocommit); `write()` and `read()` hold one for the block. Writers run concurrently at
READ COMMITTED, so `row_locks` is True: callers lock what they read-modify-write (see base.py). `read()`
is REPEATABLE READ, one snapshot for the block, as SQLite's read transaction gives.

Opening checks the schema version and refuses anything but migrations.LATEST with the command that
fixes it; `migrate()` is that command's body. Errors become one-line StoreErrors that name the server
without its password.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg_pool
from psycopg import errors as pg_errors

from gateway.store.base import POSTGRESQL, ConflictError, Database, Params, RetryableError, Row, StoreError
from gateway.store.migrations import LATEST, LOCK_KEY, MIGRATIONS

CONNECT_TIMEOUT_S = 10
# How long a caller waits for a pooled connection. Short: the registry poll and the heartbeat run on the
# gateway's event loop, and a store that is down must not hold the loop (and so SIGTERM) for long.
POOL_WAIT_S = 3.0
# An instance that stops mid-transaction (SIGSTOP, a hung host, a network partition) holds its devices'
# replay row locks, and every other instance would wait on them. The server ends such a session after
# this long idle inside a transaction (its locks go with it); the frozen instance's commit then fails and
# it exits for systemd to restart it, its unacked inputs redelivered. Batch transactions take
# milliseconds, so this only ever fires on a stuck client.
IDLE_IN_TRANSACTION_TIMEOUT_MS = 10_000
# Detect a dead server (or path to it) in about 25 s instead of the kernel's default two hours.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
_Pool = psycopg_pool.ConnectionPool[psycopg.Connection[tuple[Any, ...]]]
POOL_MAX = 4


def describe(url: str) -> str:
    """The server and database a URL names, without its password (for messages and `--json`)."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        raise StoreError("store.url: not a valid PostgreSQL URL (postgresql://user@host:port/db)") from None
    user = f"{info['user']}@" if info.get("user") else ""
    host = info.get("host") or "localhost"
    port = f":{info['port']}" if info.get("port") else ""
    return f"postgresql://{user}{host}{port}/{info.get('dbname') or ''}"


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@functools.lru_cache(maxsize=256)
def _sql(sql: str) -> str:
    """sgw's statements use `?`; psycopg wants `%s` (and a literal `%` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


def _connect(url: str) -> psycopg.Connection[tuple[Any, ...]]:
    where = describe(url)
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg.Error as exc:
        raise StoreError(f"store {where}: cannot connect: {_line(exc)}") from None


def _version(conn: psycopg.Connection[tuple[Any, ...]]) -> int:
    """The newest migration recorded (0: none, the database is empty or not sgw's)."""
    row = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return 0
    got = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    return int(got[0]) if got else 0


def check_version(where: str, version: int) -> None:
    if version == LATEST:
        return
    if version > LATEST:
        raise StoreError(f"store {where} has schema version {version}, newer than this sgw knows ({LATEST}): "
                         "upgrade sgw on this host")
    raise StoreError(f"store {where} has schema version {version}, this sgw needs {LATEST}: "
                     "run 'sgw store migrate'")


@dataclass(frozen=True)
class MigrateResult:
    where: str
    before: int
    after: int
    applied: tuple[int, ...]


def migrate(url: str, *, now_ns: int | None = None) -> MigrateResult:
    """Apply every missing migration, each in its own transaction; safe to run again and concurrently."""
    where = describe(url)
    conn = _connect(url)
    applied: list[int] = []
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
                         " description TEXT NOT NULL, applied_ns BIGINT NOT NULL)")
        before = _version(conn)
        if before > LATEST:
            check_version(where, before)
        for m in MIGRATIONS:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
                # Re-read under the lock: another run may have applied it while we waited.
                if _version(conn) >= m.version:
                    continue
                conn.execute(m.sql.encode())  # several statements: no parameters, simple query protocol
                conn.execute("INSERT INTO schema_migrations (version, description, applied_ns)"
                             " VALUES (%s, %s, %s)",
                             (m.version, m.description, time.time_ns() if now_ns is None else now_ns))
                applied.append(m.version)
        after = _version(conn)
    except psycopg.Error as exc:
        raise StoreError(f"store {where}: migration failed: {_line(exc)}") from None
    finally:
        conn.close()
    return MigrateResult(where, before, after, tuple(applied))


def schema_version(url: str) -> int:
    conn = _connect(url)
    try:
        return _version(conn)
    except psycopg.Error as exc:
        raise StoreError(f"store {describe(url)}: {_line(exc)}") from None
    finally:
        conn.close()


class PostgresDatabase(Database):
    kind = POSTGRESQL
    row_locks = True

    def __init__(self, url: str, pool: _Pool) -> None:
        self.url = url
        self.where = describe(url)
        self._pool = pool
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None

    @classmethod
    def connect(cls, url: str, *, name: str = "sgw") -> PostgresDatabase:
        """Open a pool on a migrated store; refuses an unmigrated or newer schema (StoreError)."""
        where = describe(url)
        probe = _connect(url)  # a direct connection first: its error says why, a pool timeout would not
        try:
            version = _version(probe)
        except psycopg.Error as exc:
            raise StoreError(f"store {where}: {_line(exc)}") from None
        finally:
            probe.close()
        check_version(where, version)
        pool: _Pool = psycopg_pool.ConnectionPool(
            url, min_size=1, max_size=POOL_MAX, open=False, name=name, timeout=POOL_WAIT_S,
            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S, **KEEPALIVES,
                    "options": f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT_MS}"},
            check=psycopg_pool.ConnectionPool.check_connection,
        )
        try:
            pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        except psycopg_pool.PoolTimeout:
            pool.close()
            raise StoreError(f"store {where}: the connection pool could not connect") from None
        return cls(url, pool)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except pg_errors.IntegrityError as exc:
            raise ConflictError(_line(exc)) from None
        except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure) as exc:
            raise RetryableError(f"store {self.where}: {_line(exc)}") from None
        except (psycopg.OperationalError, psycopg.InternalError, psycopg.InterfaceError,
                psycopg_pool.PoolTimeout) as exc:  # the server, the path to it or the session failed
            raise StoreError(f"store {self.where}: {_line(exc)}") from None

    @contextmanager
    def _cursor(self) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
        with self._errors():
            if self._conn is not None:
                yield self._conn
            else:
                with self._pool.connection() as conn:
                    yield conn

    def query(self, sql: str, params: Params = ()) -> list[Row]:
        with self._cursor() as conn:
            return conn.execute(_sql(sql), params).fetchall()

    def run(self, sql: str, params: Params = ()) -> int:
        with self._cursor() as conn:
            return conn.execute(_sql(sql), params).rowcount

    def run_many(self, sql: str, rows: Iterable[Params]) -> None:
        with self._cursor() as conn, conn.cursor() as cur:
            cur.executemany(_sql(sql), list(rows))  # pipeline mode: one round trip for all rows
            if self._conn is not None:
                # psycopg ends the pipeline with a flush request after its sync, and a message after the
                # sync disarms the server's idle-in-transaction timer: a client frozen right here would
                # hold its row locks forever. One plain statement re-arms it (tests/test_store.py).
                conn.execute("SELECT 1")

    @contextmanager
    def _tx(self, *, read_only: bool) -> Iterator[None]:
        if self._conn is not None:
            raise RuntimeError("transactions do not nest")
        with self._errors(), self._pool.connection() as conn, conn.transaction():
            if read_only:
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            self._conn = conn
            try:
                yield
            finally:
                self._conn = None

    def write(self) -> AbstractContextManager[None]:
        return self._tx(read_only=False)

    def read(self) -> AbstractContextManager[None]:
        return self._tx(read_only=True)

    @property
    def in_transaction(self) -> bool:
        return self._conn is not None

    def close(self) -> None:
        self._pool.close()
