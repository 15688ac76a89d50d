"""The store-and-forward outbox: sealed messages in SQLite (WAL), written before publish, deleted on the
gateway's receipt (or on PUBACK with `[outbox] delete_on = "puback"`).

Durability policy (docs/OPERATIONS.md, "Outbox durability"):
- journal_mode=WAL, synchronous=FULL: every committed insert is fsynced into the WAL before `put` returns,
  so a message the agent accepted survives SIGKILL and power loss. NORMAL would only survive SIGKILL.
  The agent forwards a few messages per second, so one fsync each is cheap.
- PUBACK deletions are batched (`ack` then `commit_acks`) and committed without an fsync
  (synchronous=NORMAL for that transaction): losing a deletion only replays a message the gateway then
  drops as a duplicate, so deletions need not be durable at once.
- The session state (epoch, window_seq) lives in the same file and is fsynced before it is used, so a
  restart never seals twice with one (key, nonce).

Bounds: `max_bytes` counts payload bytes; when a new message does not fit, drop_oldest deletes the oldest
rows (reason "full") and refuse_newest refuses the new one (reason "refused"). Rows older than `max_age_s`
are deleted by `expire` (reason "expired"). Every drop is counted by reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gateway.errors import ConfigError, LocalError
from gateway.store.sqlite import transaction

Policy = Literal["drop_oldest", "refuse_newest"]
DROP_REASONS = ("full", "expired", "refused")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_ns INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    counter INTEGER NOT NULL,
    size INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_key ON messages (epoch, counter);
CREATE TABLE IF NOT EXISTS blobs (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"""


_INSERT = "INSERT INTO messages(created_ns, epoch, counter, size, payload) VALUES (?, ?, ?, ?, ?)"


@dataclass(frozen=True, slots=True)
class Row:
    id: int
    created_ns: int
    epoch: int
    counter: int
    payload: bytes


class Outbox:
    """Single-threaded: every call comes from the agent's event loop thread."""

    def __init__(self, path: Path, *, max_bytes: int, max_age_s: float, policy: Policy) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_age_ns = int(max_age_s * 1e9)
        self.policy = policy
        self.dropped: Counter[str] = Counter()
        self._lock_fd = _lock(path)
        try:
            # isolation_level=None: we open transactions explicitly, so each write is one fsynced commit.
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            os.close(self._lock_fd)
            raise ConfigError(f"outbox.path: cannot open {path}: {exc}") from None
        count, total = self._db.execute("SELECT count(*), coalesce(sum(size), 0) FROM messages").fetchone()
        self.messages = int(count)
        self.bytes = int(total)
        self._acks: list[int] = []
        newest = self._db.execute("SELECT max(id) FROM messages").fetchone()[0]
        self.newest_id = int(newest or 0)  # lets the publisher skip a query when nothing is new

    def close(self) -> None:
        try:
            self.commit_acks()
            self._db.close()
        finally:
            os.close(self._lock_fd)

    # -- session state ------------------------------------------------------------------------------
    def get_meta(self, key: str, default: int = 0) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else int(row[0])

    def set_meta(self, **values: int) -> None:
        """Durable (fsynced) before it returns: callers rely on it before sealing."""
        with self._tx():
            self._db.executemany(
                "INSERT INTO meta(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                list(values.items()),
            )

    def get_blob(self, key: str) -> bytes | None:
        row = self._db.execute("SELECT value FROM blobs WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def set_blob(self, key: str, value: bytes, *, durable: bool = True) -> None:
        """Stored state (e.g. the downlink replay windows); `durable=False` skips the fsync."""
        with contextlib.nullcontext() if durable else self._unsynced(), self._tx():
            self._db.execute("INSERT INTO blobs(key, value) VALUES (?, ?) "
                             "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    def ids_in(self, ranges: list[tuple[int, int, int]]) -> list[int]:
        """Ids of the stored messages whose (epoch, counter) a receipt's ranges cover."""
        out: list[int] = []
        for epoch, first, last in ranges:
            out += [int(r[0]) for r in self._db.execute(
                "SELECT id FROM messages WHERE epoch = ? AND counter BETWEEN ? AND ?", (epoch, first, last))]
        return out

    def next_epoch(self, now_ms: int) -> int:
        """max(stored + 1, now in ms), stored before it is returned: never reused, never stuck in the past."""
        epoch = max(self.get_meta("epoch") + 1, now_ms)
        self.set_meta(epoch=epoch)
        return epoch

    # -- messages -----------------------------------------------------------------------------------
    def put(self, payload: bytes, *, created_ns: int, epoch: int, counter: int) -> int | None:
        """Stores a sealed message; returns its id, or None when refused (refuse_newest and full)."""
        size = len(payload)
        if size > self.max_bytes:
            self.dropped["refused"] += 1
            return None
        row = (created_ns, epoch, counter, size, payload)
        if self.bytes + size > self.max_bytes:
            if self.policy == "refuse_newest":
                self.dropped["refused"] += 1
                return None
            with self._tx():
                self._drop_oldest_until(self.max_bytes - size)
                cur = self._db.execute(_INSERT, row)
        else:
            # A lone statement in autocommit mode is its own (fsynced) transaction: one call, not three.
            try:
                cur = self._db.execute(_INSERT, row)
            except sqlite3.Error as exc:
                raise LocalError(f"outbox: cannot store a message: {exc}") from None
        self.messages += 1
        self.bytes += size
        rowid = cur.lastrowid
        if rowid is None:
            raise LocalError("outbox insert returned no row id")
        self.newest_id = rowid
        return rowid

    def _drop_oldest_until(self, budget: int) -> None:
        # Inside put's transaction. Selected in small chunks so a huge backlog is never read at once.
        while self.bytes > budget:
            rows = self._db.execute("SELECT id, size FROM messages ORDER BY id LIMIT 64").fetchall()
            if not rows:
                return
            for rid, size in rows:
                if self.bytes <= budget:
                    break
                self._db.execute("DELETE FROM messages WHERE id = ?", (rid,))
                self.messages -= 1
                self.bytes -= size
                self.dropped["full"] += 1

    def expire(self, now_ns: int) -> int:
        cutoff = now_ns - self.max_age_ns
        oldest = self.oldest_created_ns()
        if oldest is None or oldest >= cutoff:
            return 0  # the common case, by primary key: no scan, no transaction, no fsync
        with self._tx():
            count, total = self._db.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM messages WHERE created_ns < ?", (cutoff,)
            ).fetchone()
            if count:
                self._db.execute("DELETE FROM messages WHERE created_ns < ?", (cutoff,))
        self.messages -= int(count)
        self.bytes -= int(total)
        self.dropped["expired"] += int(count)
        return int(count)

    def after(self, last_id: int, limit: int) -> list[Row]:
        """The next `limit` messages with id > last_id, oldest first: the replay order."""
        rows = self._db.execute(
            "SELECT id, created_ns, epoch, counter, payload FROM messages WHERE id > ? ORDER BY id LIMIT ?",
            (last_id, limit),
        ).fetchall()
        return [Row(*r) for r in rows]

    def has_older_epoch(self, epoch: int) -> bool:
        row = self._db.execute("SELECT 1 FROM messages WHERE epoch < ? LIMIT 1", (epoch,)).fetchone()
        return row is not None

    def oldest_counter(self, epoch: int) -> int | None:
        row = self._db.execute("SELECT min(counter) FROM messages WHERE epoch = ?", (epoch,)).fetchone()
        return None if row[0] is None else int(row[0])

    def oldest_created_ns(self) -> int | None:
        row = self._db.execute("SELECT created_ns FROM messages ORDER BY id LIMIT 1").fetchone()
        return None if row is None else int(row[0])

    def ack(self, message_id: int) -> None:
        self._acks.append(message_id)

    def pending_acks(self) -> int:
        return len(self._acks)

    def commit_acks(self) -> int:
        if not self._acks:
            return 0
        ids, self._acks = self._acks, []
        # Not fsynced: a lost deletion only replays a duplicate, and the next insert's FULL commit (or a
        # checkpoint) makes it durable anyway. Saves one fsync per batch of PUBACKs.
        with self._unsynced():
            return self._delete(ids)

    @contextlib.contextmanager
    def _unsynced(self) -> Iterator[None]:
        """Commits inside are not fsynced (synchronous=NORMAL); FULL again afterwards."""
        self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            yield
        finally:
            self._db.execute("PRAGMA synchronous=FULL")

    def _delete(self, ids: list[int]) -> int:
        removed = 0
        with self._tx():
            for chunk_start in range(0, len(ids), 500):
                chunk = ids[chunk_start:chunk_start + 500]
                marks = ",".join("?" * len(chunk))
                count, total = self._db.execute(
                    f"SELECT count(*), coalesce(sum(size), 0) FROM messages WHERE id IN ({marks})",  # noqa: S608 - only '?' marks
                    chunk,
                ).fetchone()
                self._db.execute(f"DELETE FROM messages WHERE id IN ({marks})", chunk)  # noqa: S608
                removed += int(count)
                self.messages -= int(count)
                self.bytes -= int(total)
        return removed

    def _tx(self) -> contextlib.AbstractContextManager[None]:
        return _transaction(self._db)


def _lock(path: Path) -> int:
    """An exclusive lock beside the database: two agents sharing one outbox would publish each other's
    messages and delete each other's rows. Released by close() or by the kernel when the process dies."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"outbox.path: cannot create {path}.lock: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConfigError(f"outbox.path: {path} is in use by another running agent") from None
    return fd


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """The shared SQLite transaction (gateway/store/sqlite.py), its SQLite errors as one-line LocalErrors."""
    try:
        with transaction(db):
            yield
    except sqlite3.Error as exc:
        raise LocalError(f"outbox: transaction failed: {exc}") from None
