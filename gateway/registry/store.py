"""The device registry: the single source of device identity the gateway reads.

It lives in the store (gateway/store): by default one SQLite file in WAL mode, or PostgreSQL when
`[store] url` names one. Writers (the `sgw device ...` commands, possibly several at once) take the
registry's write lock at the start of their transaction: SQLite's BEGIN IMMEDIATE (waiting on
`busy_timeout`), or on PostgreSQL the `generation` row FOR UPDATE, which every registry write bumps anyway.
So concurrent commands serialise instead of failing half-way through, on either store. Every device or
key write bumps `generation` in the same transaction; the gateway polls that one integer to know when to
reload its key cache.
"""

from __future__ import annotations

import builtins
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.core import suites
from gateway.core.session import DeviceKeys, KeyEntry
from gateway.errors import ProvisioningError
from gateway.registry.ids import validate_device_id
from gateway.store.base import ConflictError, Database, Location, chunks, is_postgres_url, marks
from gateway.store.sqlite import BUSY_TIMEOUT_MS, SqliteDatabase, transaction

SCHEMA_VERSION = 2
__all__ = ["BUSY_TIMEOUT_MS", "DeviceRecord", "KeyRecord", "NewDevice", "Registry"]
ACTIVE = "active"
REVOKED = "revoked"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    device_id         TEXT PRIMARY KEY,
    kind              TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    cert_serial       TEXT NOT NULL,
    cert_not_after_ns INTEGER NOT NULL,
    created_ns        INTEGER NOT NULL,
    revoked_ns        INTEGER,
    min_suite         INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS keys (
    device_id    TEXT NOT NULL REFERENCES devices(device_id) ON DELETE CASCADE,
    key_id       INTEGER NOT NULL,
    public       BLOB NOT NULL CHECK (length(public) = 32),
    created_ns   INTEGER NOT NULL,
    not_after_ns INTEGER,
    PRIMARY KEY (device_id, key_id)
);
-- Certificates outlive their device rows: a removed or rotated device's old certificate must stay on
-- the CRL until it expires.
CREATE TABLE IF NOT EXISTS certs (
    serial       TEXT PRIMARY KEY,
    device_id    TEXT NOT NULL,
    not_after_ns INTEGER NOT NULL,
    revoked_ns   INTEGER
);
CREATE TABLE IF NOT EXISTS replay (
    device_id TEXT PRIMARY KEY REFERENCES devices(device_id) ON DELETE CASCADE,
    state     BLOB NOT NULL
);
INSERT OR IGNORE INTO meta (name, value) VALUES ('generation', 0), ('schema', 2);
"""

# Schema 1 -> 2 (issue 17): the weakest uplink suite a device may seal with. Every existing device keeps
# suite 1 (X25519), what it has been using; `sgw device add --suite` sets it for new ones.
_MIGRATE_1_TO_2 = """
ALTER TABLE devices ADD COLUMN min_suite INTEGER NOT NULL DEFAULT 1;
UPDATE meta SET value = 2 WHERE name = 'schema';
"""


@dataclass(frozen=True)
class KeyRecord:
    key_id: int
    public: bytes
    created_ns: int
    not_after_ns: int | None


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    kind: str
    status: str
    cert_serial: str
    cert_not_after_ns: int
    created_ns: int
    revoked_ns: int | None
    keys: tuple[KeyRecord, ...]
    min_suite: int = suites.X25519

    def to_json(self) -> dict[str, object]:
        """Public facts only (public keys as hex); used by `sgw device show --json`."""
        return {
            "id": self.device_id,
            "kind": self.kind,
            "status": self.status,
            "cert_serial": self.cert_serial,
            "cert_not_after_ns": self.cert_not_after_ns,
            "created_ns": self.created_ns,
            "revoked_ns": self.revoked_ns,
            "min_suite": suites.NAMES.get(self.min_suite, str(self.min_suite)),
            "keys": [
                {"key_id": k.key_id, "public": k.public.hex(), "created_ns": k.created_ns,
                 "not_after_ns": k.not_after_ns}
                for k in self.keys
            ],
        }


def _record(row: Sequence[Any], keys: tuple[KeyRecord, ...]) -> DeviceRecord:
    dev, kind, status, serial, cert_na, created, revoked, min_suite = row
    return DeviceRecord(
        str(dev), str(kind), str(status), str(serial), int(cert_na), int(created),
        None if revoked is None else int(revoked), keys, int(min_suite),
    )


@dataclass(frozen=True)
class NewDevice:
    device_id: str
    kind: str
    public_key: bytes
    cert_serial: str
    cert_not_after_ns: int
    min_suite: int = suites.X25519


class Registry:
    def __init__(self, db: Database, path: Location) -> None:
        self.db = db
        self.path = path  # the SQLite file, or the PostgreSQL URL (never printed: use `where`)
        self.where = db.where

    @classmethod
    def open(cls, where: Location, *, create: bool = False) -> Registry:
        """Open the registry at a SQLite path or a PostgreSQL URL (which must be migrated already)."""
        if is_postgres_url(where):
            from gateway.store.postgres import PostgresDatabase  # noqa: PLC0415 - psycopg only when used

            db: Database = PostgresDatabase.connect(str(where), name="sgw-registry")
        else:
            db = _open_sqlite(Path(where), create=create)
        try:
            schema = db.one("SELECT value FROM meta WHERE name = 'schema'")
        except BaseException:
            db.close()
            raise
        if schema is None or schema[0] != SCHEMA_VERSION:
            db.close()
            raise ProvisioningError(f"registry {db.where} has schema {schema}, expected {SCHEMA_VERSION}")
        return cls(db, where)

    def close(self) -> None:
        self.db.close()

    def locked(self, *, bump: bool = True) -> AbstractContextManager[Database]:
        """The caller's open `transaction()`, else a write transaction under the registry's write lock (for
        the enrollment tables, gateway/registry/enrollment.py, which do not bump `generation`: the
        gateway reads none of them)."""
        return self._maybe_write(bump=bump)

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self, *, bump: bool = True) -> Iterator[Database]:
        db = self.db
        with db.write():
            if db.row_locks:
                # The registry's write lock where the database has no global one: every registry write
                # bumps this row, so taking it first serialises registry writers as BEGIN IMMEDIATE does.
                db.query("SELECT value FROM meta WHERE name = 'generation' FOR UPDATE")
            yield db
            if bump:
                db.run("UPDATE meta SET value = value + 1 WHERE name = 'generation'")

    @contextmanager
    def transaction(self) -> Iterator[Registry]:
        """Group several writes (and a caller's file step) into one transaction.

        The caller's code runs while the write lock is held; if it raises, nothing is committed. `sgw
        device add` renames the staged bundle into place inside this block, so a registry row never
        exists without its bundle or the other way round.
        """
        with self._write():
            yield self

    def _in_tx(self) -> bool:
        return self.db.in_transaction

    @contextmanager
    def _maybe_write(self, *, bump: bool = True) -> Iterator[Database]:
        """The caller's open `transaction()`, else a write transaction of its own."""
        if self._in_tx():
            yield self.db
        else:
            with self._write(bump=bump) as db:
                yield db

    # -- devices --------------------------------------------------------------------------------

    def add_device(
        self, device_id: str, kind: str, public_key: bytes, cert_serial: str, cert_not_after_ns: int
    ) -> None:
        self.add_devices([NewDevice(device_id, kind, public_key, cert_serial, cert_not_after_ns)])

    def add_devices(self, devices: Iterable[NewDevice], *, now_ns: int | None = None) -> int:
        """Insert many devices in one transaction (all or none); returns how many were added."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        count = 0
        with self._maybe_write() as db:
            for dev in devices:
                validate_device_id(dev.device_id)
                if len(dev.public_key) != 32:
                    raise ProvisioningError(f"device {dev.device_id}: public key must be 32 bytes")
                if dev.min_suite not in suites.UPLINK:
                    raise ProvisioningError(f"device {dev.device_id}: unknown suite {dev.min_suite}")
                try:
                    db.run(
                        "INSERT INTO devices (device_id, kind, status, cert_serial, cert_not_after_ns,"
                        " created_ns, min_suite) VALUES (?, ?, 'active', ?, ?, ?, ?)",
                        (dev.device_id, dev.kind, dev.cert_serial, dev.cert_not_after_ns, now_ns,
                         dev.min_suite),
                    )
                except (sqlite3.IntegrityError, ConflictError):
                    raise ProvisioningError(f"device {dev.device_id} already exists") from None
                db.run(
                    "INSERT INTO keys (device_id, key_id, public, created_ns) VALUES (?, 1, ?, ?)",
                    (dev.device_id, dev.public_key, now_ns),
                )
                # A reused serial takes the whole row over (what INSERT OR REPLACE did, in portable SQL).
                db.run(
                    "INSERT INTO certs (serial, device_id, not_after_ns) VALUES (?, ?, ?)"
                    " ON CONFLICT (serial) DO UPDATE SET device_id = excluded.device_id,"
                    " not_after_ns = excluded.not_after_ns, revoked_ns = NULL",
                    (dev.cert_serial, dev.device_id, dev.cert_not_after_ns),
                )
                count += 1
        return count

    def get(self, device_id: str) -> DeviceRecord | None:
        db = self.db
        row = db.one(
            "SELECT device_id, kind, status, cert_serial, cert_not_after_ns, created_ns, revoked_ns,"
            " min_suite FROM devices WHERE device_id = ?",
            (device_id,),
        )
        if row is None:
            return None
        keys = db.query(
            "SELECT key_id, public, created_ns, not_after_ns FROM keys WHERE device_id = ? ORDER BY key_id",
            (device_id,),
        )
        return _record(row, tuple(_key(k) for k in keys))

    def list(self) -> builtins.list[DeviceRecord]:
        keys: dict[str, builtins.list[KeyRecord]] = {}
        for dev, *k in self.db.query(
            "SELECT device_id, key_id, public, created_ns, not_after_ns FROM keys ORDER BY device_id, key_id"
        ):
            keys.setdefault(dev, []).append(_key(k))
        rows = self.db.query(
            "SELECT device_id, kind, status, cert_serial, cert_not_after_ns, created_ns, revoked_ns,"
            " min_suite FROM devices ORDER BY device_id"
        )
        return [_record(row, tuple(keys.get(row[0], ()))) for row in rows]

    def _require(self, db: Database, device_id: str) -> str:
        row = db.one("SELECT status FROM devices WHERE device_id = ?", (device_id,))
        if row is None:
            raise ProvisioningError(f"unknown device {device_id}")
        return str(row[0])

    def revoke(self, device_id: str, now_ns: int) -> None:
        """Mark the device revoked and every certificate it holds revoked (for the CRL)."""
        with self._maybe_write() as db:
            status = self._require(db, device_id)
            if status == REVOKED:
                raise ProvisioningError(f"device {device_id} is already revoked")
            db.run(
                "UPDATE devices SET status = 'revoked', revoked_ns = ? WHERE device_id = ?",
                (now_ns, device_id),
            )
            db.run(
                "UPDATE certs SET revoked_ns = ? WHERE device_id = ? AND revoked_ns IS NULL",
                (now_ns, device_id),
            )

    def rotate_key(
        self,
        device_id: str,
        new_public: bytes,
        grace_s: int,
        now_ns: int,
        *,
        new_cert_serial: str | None = None,
        new_cert_not_after_ns: int | None = None,
    ) -> int:
        """Add a new e2e key and return its key_id; older open-ended keys expire after `grace_s`.

        With `new_cert_serial`, the device's certificate is replaced in the same transaction; the old one
        is recorded as revoked from the end of the grace period (the CRL lists it once that time passed
        and the CRL is re-issued).
        """
        if len(new_public) != 32:
            raise ProvisioningError("public key must be 32 bytes")
        if grace_s < 0:
            raise ProvisioningError("grace must be >= 0 seconds")
        until = now_ns + grace_s * 1_000_000_000
        with self._maybe_write() as db:
            if self._require(db, device_id) == REVOKED:
                raise ProvisioningError(f"device {device_id} is revoked; add it again under a new id")
            row = db.one("SELECT coalesce(max(key_id), 0) FROM keys WHERE device_id = ?", (device_id,))
            new_id = int(row[0] if row else 0) + 1
            if new_id > 0xFFFFFFFF:
                raise ProvisioningError(f"device {device_id} has run out of key ids")
            db.run(
                "UPDATE keys SET not_after_ns = ? WHERE device_id = ? AND (not_after_ns IS NULL"
                " OR not_after_ns > ?)",
                (until, device_id, until),
            )
            db.run(
                "INSERT INTO keys (device_id, key_id, public, created_ns) VALUES (?, ?, ?, ?)",
                (device_id, new_id, new_public, now_ns),
            )
            if new_cert_serial is not None:
                if new_cert_not_after_ns is None:
                    raise ProvisioningError("new_cert_not_after_ns is required with new_cert_serial")
                # A shorter grace on a second rotation also shortens what the first one granted.
                db.run(
                    "UPDATE certs SET revoked_ns = ? WHERE device_id = ?"
                    " AND (revoked_ns IS NULL OR revoked_ns > ?)",
                    (until, device_id, until),
                )
                db.run(
                    "INSERT INTO certs (serial, device_id, not_after_ns) VALUES (?, ?, ?)",
                    (new_cert_serial, device_id, new_cert_not_after_ns),
                )
                db.run(
                    "UPDATE devices SET cert_serial = ?, cert_not_after_ns = ? WHERE device_id = ?",
                    (new_cert_serial, new_cert_not_after_ns, device_id),
                )
        return new_id

    def set_min_suite(self, device_id: str, suite: int) -> int:
        """Record the weakest suite the device may seal with; returns the previous minimum. Bumps
        `generation`, so running gateways apply it at their next registry poll."""
        if suite not in suites.UPLINK:
            raise ProvisioningError(f"unknown suite {suite}")
        with self._maybe_write() as db:
            self._require(db, device_id)
            row = db.one("SELECT min_suite FROM devices WHERE device_id = ?", (device_id,))
            db.run("UPDATE devices SET min_suite = ? WHERE device_id = ?", (suite, device_id))
        return int(row[0]) if row else suites.X25519

    def retire_keys_before(self, device_id: str, key_id: int, now_ns: int) -> int:
        """End the grace period early: the device has been seen using `key_id`, so older keys stop now.

        For the gateway to call once a rotated device authenticates with its new key. Returns how many
        keys were retired.
        """
        with self._maybe_write() as db:
            return db.run(
                "UPDATE keys SET not_after_ns = ? WHERE device_id = ? AND key_id < ?"
                " AND (not_after_ns IS NULL OR not_after_ns > ?)",
                (now_ns, device_id, key_id, now_ns),
            )

    def remove(self, device_id: str, now_ns: int | None = None) -> None:
        """Delete the device, its keys and replay state; its certificates stay listed as revoked."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        with self._maybe_write() as db:
            self._require(db, device_id)
            db.run(
                "UPDATE certs SET revoked_ns = ? WHERE device_id = ?"
                " AND (revoked_ns IS NULL OR revoked_ns > ?)",
                (now_ns, device_id, now_ns),
            )
            db.run("DELETE FROM devices WHERE device_id = ?", (device_id,))

    def revoked_certs(self, now_ns: int) -> builtins.list[tuple[str, int]]:
        """(serial_hex, revoked_at_ns) of every unexpired certificate that is revoked by `now_ns`."""
        return [
            (str(s), int(r))
            for s, r in self.db.query(
                "SELECT serial, revoked_ns FROM certs WHERE revoked_ns IS NOT NULL AND revoked_ns <= ?"
                " AND not_after_ns > ? ORDER BY serial",
                (now_ns, now_ns),
            )
        ]

    # -- the gateway's view -----------------------------------------------------------------------

    def snapshot(self) -> dict[str, DeviceKeys]:
        # One read transaction so the devices and keys tables are seen at the same generation.
        db = self.db
        with db.read():
            status = {str(d): (str(s), int(m))
                      for d, s, m in db.query("SELECT device_id, status, min_suite FROM devices")}
            keys: dict[str, dict[int, KeyEntry]] = {d: {} for d in status}
            for dev, k, p, n in db.query("SELECT device_id, key_id, public, not_after_ns FROM keys"):
                keys[dev][int(k)] = KeyEntry(public=bytes(p), not_after_ns=_opt_int(n))
        return {d: DeviceKeys(status=s, keys=keys[d], min_suite=m) for d, (s, m) in status.items()}

    def generation(self) -> int:
        row = self.db.one("SELECT value FROM meta WHERE name = 'generation'")
        if row is None:
            raise ProvisioningError(f"registry {self.where} has no generation row")
        return int(row[0])

    def seen_devices(self) -> set[str]:
        """Devices a gateway has accepted a message from (a replay window is stored), without the windows."""
        return {str(d) for (d,) in self.db.query("SELECT device_id FROM replay WHERE length(state) > 0")}

    def load_replay(self) -> dict[str, bytes]:
        # An empty state is a row PostgreSQL's per-batch transaction created to lock (server/store.py).
        return {str(d): bytes(s) for d, s in self.db.query("SELECT device_id, state FROM replay") if s}

# -- the `replay` table inside a caller's transaction ------------------------------------------------
# The gateway's batch transaction (gateway/server/store.py) merges each device's window there together
# with its pending results, so the rows are written through these, beside the table's schema, never by
# SQL of its own.


def lock_replay_rows(db: Database, devices: Sequence[str]) -> None:
    """Where writers run concurrently (PostgreSQL), make sure each device has a row to lock: a missing
    row cannot be locked, and two instances inserting a device's first window would otherwise both see
    it fresh. Rows are created in the order given (sorted by the caller), an empty state for none yet;
    removed devices get none. Nothing to do where the database lock covers every row (SQLite)."""
    if db.row_locks:
        db.run_many("INSERT INTO replay (device_id, state) SELECT ?, ? WHERE EXISTS"
                    " (SELECT 1 FROM devices WHERE device_id = ?) ON CONFLICT (device_id) DO NOTHING",
                    [(d, b"", d) for d in devices])


def read_replay_rows(db: Database, devices: Sequence[str]) -> dict[str, bytes]:
    """The stored windows of `devices` (sorted), locked for this transaction where row locks apply, in
    that order so two transactions sharing devices wait for each other instead of deadlocking. An empty
    state is the row `lock_replay_rows` made: no window yet."""
    out: dict[str, bytes] = {}
    for chunk in chunks(devices):
        for dev, state in db.query(
            f"SELECT device_id, state FROM replay WHERE device_id IN ({marks(len(chunk))})"  # noqa: S608
            f" ORDER BY device_id{db.for_update}",
            chunk,
        ):
            out[str(dev)] = bytes(state) if state else b""
    return out


def write_replay_rows(db: Database, states: Mapping[str, bytes]) -> None:
    """Store windows (devices removed meanwhile are skipped)."""
    db.run_many(
        "INSERT INTO replay (device_id, state) SELECT ?, ? WHERE EXISTS"
        " (SELECT 1 FROM devices WHERE device_id = ?)"
        " ON CONFLICT (device_id) DO UPDATE SET state = excluded.state",
        [(d, s, d) for d, s in states.items()],
    )


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _key(row: Sequence[Any]) -> KeyRecord:
    k, public, created, not_after = row
    return KeyRecord(int(k), bytes(public), int(created), _opt_int(not_after))


def _open_sqlite(path: Path, *, create: bool) -> Database:
    if not create and not path.exists():
        raise ProvisioningError(f"no registry at {path}; run 'sgw ca init' first")
    try:
        db = SqliteDatabase.connect(path, foreign_keys=True)
        conn = db.conn
        if create:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.executescript(_SCHEMA)
        conn.execute("PRAGMA synchronous = NORMAL")
        schema = conn.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        if schema is not None and schema[0] == 1:
            _migrate_1_to_2(conn)
    except sqlite3.DatabaseError as exc:
        raise ProvisioningError(f"registry {path} is unusable: {exc}") from None
    return db


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    """SQLite registries made before suites: additive and idempotent. Under the write lock, re-read the
    schema (another process may have migrated meanwhile), add the column, bump the schema, all in one
    transaction. (PostgreSQL stores have the column from their first migration.)"""
    with transaction(conn):
        (current,) = conn.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        if current == 1:
            for statement in filter(None, (s.strip() for s in _MIGRATE_1_TO_2.split(";"))):
                conn.execute(statement)
