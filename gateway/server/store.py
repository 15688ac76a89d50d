"""The gateway's durable state: replay windows and results not yet PUBACKed, in the registry database.

One transaction per inference batch (BEGIN IMMEDIATE) does three things together:
  1. merges this batch's (device, epoch, counter) into the stored replay windows: read, set, write.
     An item already set there was processed by another gateway instance on the same shared
     subscription (or before a crash whose redelivery raced us): it is dropped as a replay here;
  2. inserts the batch's serialized ResultBatch (kept items only) into `gateway_pending`;
  3. deletes pending rows whose PUBACK arrived since the last batch (deferred, so a PUBACK costs no
     transaction of its own).
After a crash the process reloads the windows (redelivered inputs are replays) and republishes every
pending row, so each window gets exactly one result, possibly delivered more than once (the result's
(device_id, epoch, counter) is the idempotency key).

This module writes the registry's `replay` table directly (same rows `Registry.save_replay` writes),
because the Registry API has no way to put that write and the pending insert in one transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

from gateway.core.replay import ReplayWindow
from gateway.errors import LocalError

BUSY_TIMEOUT_MS = 30_000

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
"""

# (device_id, epoch, counter, device key id)
Key = tuple[str, int, int, int]


class ResultStore:
    def __init__(self, path: Path, gateway_id: str, *, window_bits: int = 2048) -> None:
        try:
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise LocalError(f"registry {path}: cannot prepare the gateway tables: {exc}") from None
        self._conn = conn
        self._gateway_id = gateway_id
        self._width = window_bits
        self._acked: list[int] = []

    def close(self) -> None:
        self._conn.close()

    def _window(self, state: bytes | None) -> ReplayWindow:
        if state is None:
            return ReplayWindow(self._width)
        window = ReplayWindow.from_bytes(bytes(state))
        return window if window.width == self._width else window.resized(self._width)

    def commit(self, keys: Sequence[Key], build: Callable[[list[bool]], bytes | None],
               now_ns: int) -> tuple[int | None, list[bool], bytes | None]:
        """Merge `keys` into the stored windows, then store `build(keep)`; returns (id, keep, payload).

        keep[i] is False when keys[i] was already recorded (processed elsewhere): it must get no result.
        """
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._purge(conn)
            devices = list({k[0] for k in keys})
            windows: dict[str, ReplayWindow] = {}
            for start in range(0, len(devices), 500):
                chunk = devices[start:start + 500]
                marks = ",".join("?" * len(chunk))
                for dev, state in conn.execute(
                    f"SELECT device_id, state FROM replay WHERE device_id IN ({marks})",  # noqa: S608
                    chunk,
                ):
                    windows[str(dev)] = self._window(state)
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
            conn.executemany(
                "INSERT INTO replay (device_id, state) SELECT ?, ? WHERE EXISTS"
                " (SELECT 1 FROM devices WHERE device_id = ?)"
                " ON CONFLICT (device_id) DO UPDATE SET state = excluded.state",
                [(d, w.to_bytes(), d) for d, w in windows.items()],
            )
            payload = build(keep)
            pending_id: int | None = None
            if payload is not None:
                cur = conn.execute(
                    "INSERT INTO gateway_pending (gateway_id, created_ns, payload) VALUES (?, ?, ?)",
                    (self._gateway_id, now_ns, payload),
                )
                pending_id = cur.lastrowid
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return pending_id, keep, payload

    def published(self, pending_id: int) -> None:
        """Its PUBACK arrived: delete it with the next transaction (or `purge`)."""
        self._acked.append(pending_id)

    def _purge(self, conn: sqlite3.Connection) -> None:
        if self._acked:
            ids, self._acked = self._acked, []
            conn.executemany("DELETE FROM gateway_pending WHERE id = ?", [(i,) for i in ids])

    def next_downlink_epoch(self, now_ms: int) -> int:
        """A downlink session epoch for this instance, strictly above every earlier one (devices refuse
        an older epoch): the wall clock in ms, or one past the last if the clock went back."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT epoch FROM gateway_downlink WHERE gateway_id = ?",
                               (self._gateway_id,)).fetchone()
            epoch = max(now_ms, (row[0] + 1) if row else 0)
            conn.execute("INSERT INTO gateway_downlink (gateway_id, epoch) VALUES (?, ?) "
                         "ON CONFLICT (gateway_id) DO UPDATE SET epoch = excluded.epoch",
                         (self._gateway_id, epoch))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return epoch

    def purge(self) -> None:
        """Delete acknowledged rows now (idle time, shutdown)."""
        if not self._acked:
            return
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._purge(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def pending(self) -> list[tuple[int, bytes]]:
        """This gateway's results that may never have reached the broker (republished at start)."""
        return [
            (int(i), bytes(p))
            for i, p in self._conn.execute(
                "SELECT id, payload FROM gateway_pending WHERE gateway_id = ? ORDER BY id",
                (self._gateway_id,),
            )
        ]

    def payload(self, pending_id: int) -> bytes | None:
        """One stored result batch (published later than stored when the broker confirms slowly)."""
        row = self._conn.execute(
            "SELECT payload FROM gateway_pending WHERE id = ? AND gateway_id = ?",
            (pending_id, self._gateway_id),
        ).fetchone()
        return None if row is None else bytes(row[0])

    def pending_count(self) -> int:
        (n,) = self._conn.execute(
            "SELECT count(*) FROM gateway_pending WHERE gateway_id = ?", (self._gateway_id,)
        ).fetchone()
        return int(n)
