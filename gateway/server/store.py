"""The gateway's durable state: replay windows and results not yet PUBACKed, in the registry's store.

One transaction per inference batch does three things together:
  1. merges this batch's (device, epoch, counter) into the stored replay windows: read, set, write.
     An item already set there was processed by another gateway instance on the same shared
     subscription (or before a crash whose redelivery raced us): it is dropped as a replay here;
  2. inserts the batch's ResultBatch (the kept items' results, framed by core/results.py) into
     `gateway_pending`;
  3. deletes pending rows whose PUBACK arrived since the last batch (deferred, so a PUBACK costs no
     transaction of its own).
After a crash the process reloads the windows (redelivered inputs are replays) and republishes every
pending row, so each window gets exactly one result, possibly delivered more than once (the result's
(device_id, epoch, counter) is the idempotency key).

Exactly once across instances, by store (gateway/store/base.py):
- SQLite: BEGIN IMMEDIATE takes the database's one write lock, so step 1's read-modify-write of every
  window is never interleaved with another instance's.
- PostgreSQL: instances commit concurrently, so the transaction locks the batch's devices' replay rows
  (SELECT ... FOR UPDATE) before reading them, in device-id order so two batches sharing devices wait
  for each other instead of deadlocking. A device with no row yet gets an empty one first (INSERT ... ON
  CONFLICT DO NOTHING, same order): a missing row cannot be locked, and two instances inserting the
  first window of a device would otherwise both see it fresh. The second instance's FOR UPDATE waits for
  the first's commit, then reads the window the first wrote: the shared window is dropped as a replay.

The `replay` rows are read, locked and written through the registry's functions for that table
(`lock_replay_rows`, `read_replay_rows`, `write_replay_rows` in gateway/registry/store.py, beside its
schema), inside this module's transaction, so the windows and the pending insert commit together.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from gateway.core.replay import ReplayWindow
from gateway.core.results import result_batch
from gateway.errors import LocalError
from gateway.registry.store import lock_replay_rows, read_replay_rows, write_replay_rows
from gateway.store.base import Database, Location, RetryableError, chunks, is_postgres_url, marks
from gateway.store.sqlite import BUSY_TIMEOUT_MS, SqliteDatabase

__all__ = ["BUSY_TIMEOUT_MS", "Key", "ResultStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS gateway_pending (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    gateway_id TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    payload    BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS gateway_pending_by_gateway ON gateway_pending (gateway_id, id);
CREATE TABLE IF NOT EXISTS gateway_downlink (
    gateway_id TEXT PRIMARY KEY,
    epoch      INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS gateway_instances (
    gateway_id   TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    version      TEXT NOT NULL,
    started_ns   INTEGER NOT NULL,
    heartbeat_ns INTEGER NOT NULL,
    stopped_ns   INTEGER
);
"""

COMMIT_ATTEMPTS = 3

# (device_id, epoch, counter, device key id)
Key = tuple[str, int, int, int]


def open_database(where: Location) -> Database:
    """The gateway's connection to the store: SQLite gets its tables here (as it always has); PostgreSQL
    must have been migrated by `sgw store migrate` (refused otherwise, never migrated here)."""
    if is_postgres_url(where):
        from gateway.store.postgres import PostgresDatabase  # noqa: PLC0415 - psycopg only when used

        return PostgresDatabase.connect(str(where), name="sgw-results")
    path = Path(where)
    try:
        db = SqliteDatabase.connect(path)
        db.conn.execute("PRAGMA synchronous = NORMAL")
        db.conn.executescript(_SCHEMA)
    except sqlite3.DatabaseError as exc:
        raise LocalError(f"registry {path}: cannot prepare the gateway tables: {exc}") from None
    return db


class ResultStore:
    def __init__(self, where: Location, gateway_id: str, *, window_bits: int = 2048) -> None:
        self._db = open_database(where)
        self._gateway_id = gateway_id
        self._width = window_bits
        self._acked: list[int] = []

    @property
    def db(self) -> Database:
        return self._db

    def close(self) -> None:
        self._db.close()

    def _window(self, state: bytes | None) -> ReplayWindow:
        if not state:  # no row, or the empty row a PostgreSQL commit creates before locking it
            return ReplayWindow(self._width)
        window = ReplayWindow.from_bytes(bytes(state))
        return window if window.width == self._width else window.resized(self._width)

    def commit(self, keys: Sequence[Key], results: Sequence[bytes],
               now_ns: int) -> tuple[int | None, list[bool], bytes | None]:
        """Merge `keys` into the stored windows and store the ResultBatch of the kept ones' `results`
        (results[i]: keys[i]'s serialized InferenceResult); returns (id, keep, payload), id and payload
        None when nothing was kept.

        keep[i] is False when keys[i] was already recorded (processed elsewhere): it must get no result.
        A transaction the database aborted to break a lock cycle (PostgreSQL only; the ordered locks
        below should leave none) is run again, a few times, before the error stands.
        """
        for attempt in range(COMMIT_ATTEMPTS):
            acked = list(self._acked)
            try:
                return self._commit(keys, results, now_ns)
            except RetryableError:
                self._acked = acked + self._acked  # the rolled-back deletions are owed again
                if attempt == COMMIT_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _commit(self, keys: Sequence[Key], results: Sequence[bytes],
                now_ns: int) -> tuple[int | None, list[bool], bytes | None]:
        if len(results) != len(keys):
            raise ValueError("one result per key")
        db = self._db
        with db.write():
            self._purge(db)
            devices = sorted({k[0] for k in keys})
            lock_replay_rows(db, devices)
            windows = {d: self._window(state) for d, state in read_replay_rows(db, devices).items()}
            keep: list[bool] = []
            for device_id, epoch, counter, key_id in keys:
                window = windows.get(device_id)
                if window is None:
                    window = windows[device_id] = self._window(None)
                fresh = window.check(epoch, counter) is None
                if fresh:
                    window.commit(epoch, counter)
                    window.key_floor = max(window.key_floor, key_id)
                keep.append(fresh)
            write_replay_rows(db, {d: w.to_bytes() for d, w in windows.items()})
            payload = (result_batch(self._gateway_id, [r for r, k in zip(results, keep, strict=True) if k])
                       if any(keep) else None)
            pending_id: int | None = None
            if payload is not None:
                row = db.one(
                    "INSERT INTO gateway_pending (gateway_id, created_ns, payload) VALUES (?, ?, ?)"
                    " RETURNING id",
                    (self._gateway_id, now_ns, payload),
                )
                pending_id = None if row is None else int(row[0])
        return pending_id, keep, payload

    def published(self, pending_id: int) -> None:
        """Its PUBACK arrived: delete it with the next transaction (or `purge`)."""
        self._acked.append(pending_id)

    def _purge(self, db: Database) -> None:
        if self._acked:
            ids, self._acked = self._acked, []
            db.run_many("DELETE FROM gateway_pending WHERE id = ?", [(i,) for i in ids])

    def next_downlink_epoch(self, now_ms: int) -> int:
        """A downlink session epoch for this instance, strictly above every earlier one (devices refuse
        an older epoch): the wall clock in ms, or one past the last if the clock went back."""
        db = self._db
        gid = self._gateway_id
        with db.write():
            if db.row_locks:  # a row to lock, so two starts of one id on two hosts take turns
                db.run("INSERT INTO gateway_downlink (gateway_id, epoch) VALUES (?, 0)"
                       " ON CONFLICT (gateway_id) DO NOTHING", (gid,))
            row = db.one(f"SELECT epoch FROM gateway_downlink WHERE gateway_id = ?{db.for_update}",  # noqa: S608
                         (gid,))
            epoch = max(now_ms, (int(row[0]) + 1) if row else 0)
            db.run("INSERT INTO gateway_downlink (gateway_id, epoch) VALUES (?, ?) "
                   "ON CONFLICT (gateway_id) DO UPDATE SET epoch = excluded.epoch", (gid, epoch))
        return epoch

    def take_over(self, now_ns: int, after_s: float) -> list[tuple[int, str]]:
        """Make this instance the owner of every result stored by another instance whose heartbeat is
        older than `after_s` (or that never registered, e.g. rows moved by `sgw store copy`), so it is
        published here; returns (id, previous owner), oldest first.

        Each row moves once: the rows are read under the write lock (SQLite's one writer, PostgreSQL's
        FOR UPDATE, which re-checks a row another survivor changed meanwhile and then finds it owned by a
        live instance), so two survivors never both take one. The previous owner, if it was only
        frozen, no longer finds the row among its own (`payload`, `pending`) and a PUBACK it still gets
        deletes it by id: the result may then be delivered twice, identically, which its
        (device_id, epoch, counter) key exists for."""
        cutoff = now_ns - int(after_s * 1e9)
        me = self._gateway_id
        db = self._db
        orphans = ("FROM gateway_pending p WHERE p.gateway_id <> ? AND NOT EXISTS (SELECT 1 FROM"
                   " gateway_instances i WHERE i.gateway_id = p.gateway_id AND i.heartbeat_ns >= ?)")
        if db.one(f"SELECT 1 {orphans} LIMIT 1", (me, cutoff)) is None:
            return []  # the usual case, checked without taking the write lock
        with db.write():
            self._purge(db)
            rows = db.query(f"SELECT p.id, p.gateway_id {orphans} ORDER BY p.id{db.for_update}",
                            (me, cutoff))
            moved = [(int(i), str(owner)) for i, owner in rows]
            for chunk in chunks([i for i, _ in moved]):
                db.run(f"UPDATE gateway_pending SET gateway_id = ? WHERE id IN ({marks(len(chunk))})",  # noqa: S608
                       (me, *chunk))
        return moved

    def purge(self) -> None:
        """Delete acknowledged rows now (idle time, shutdown)."""
        if not self._acked:
            return
        with self._db.write():
            self._purge(self._db)

    def pending(self) -> list[tuple[int, bytes]]:
        """This gateway's results that may never have reached the broker (republished at start)."""
        return [
            (int(i), bytes(p))
            for i, p in self._db.query(
                "SELECT id, payload FROM gateway_pending WHERE gateway_id = ? ORDER BY id",
                (self._gateway_id,),
            )
        ]

    def payload(self, pending_id: int) -> bytes | None:
        """One stored result batch (published later than stored when the broker confirms slowly)."""
        row = self._db.one(
            "SELECT payload FROM gateway_pending WHERE id = ? AND gateway_id = ?",
            (pending_id, self._gateway_id),
        )
        return None if row is None else bytes(row[0])
