"""The enrollment tables in the registry's store: allow-listed manufacturer CAs, their serials, what each
IDevID asked and got, and the nonces seen (the replay cache survives a restart of the service).

Written against the store interface (gateway/store/base.py), so enrollment runs on SQLite and on
PostgreSQL alike. Versioned on their own (`meta.enroll_schema`): on SQLite created on first use by `sgw
enroll ...` (a home made before enrollment existed keeps its `schema` and the gateway, which never reads
these tables, opens it unchanged); on PostgreSQL by migration 3 (`sgw store migrate`). Writes take the
registry's write lock without bumping its generation (nothing the gateway reads changes), so concurrent
`sgw enroll` commands and the service serialise on both stores, and an enrollment joins the registry's
`transaction()` that adds its device when one is open.
"""

from __future__ import annotations

import builtins
import hashlib
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.core import suites
from gateway.errors import ProvisioningError
from gateway.registry.store import Registry
from gateway.store.base import Database

ENROLL_SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS enroll_cas (
    fingerprint TEXT PRIMARY KEY,          -- sha256 of the CA certificate's DER, hex
    pem         BLOB NOT NULL,
    subject     TEXT NOT NULL,
    prefix      TEXT NOT NULL,             -- device id = prefix + serial
    any_serial  INTEGER NOT NULL,          -- 1: every serial this CA signs, 0: only enroll_serials
    suite       INTEGER NOT NULL DEFAULT 1, -- the uplink suite its devices seal with and are held to
    added_ns    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS enroll_serials (
    fingerprint TEXT NOT NULL REFERENCES enroll_cas(fingerprint) ON DELETE CASCADE,
    serial      TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('allowed', 'refused')),
    note        TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (fingerprint, serial)
);
CREATE TABLE IF NOT EXISTS enrollments (
    fingerprint  TEXT NOT NULL,
    serial       TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('approved', 'refused')),
    reason       TEXT NOT NULL DEFAULT '',
    detail       TEXT NOT NULL DEFAULT '',
    device_id    TEXT,
    idevid       TEXT NOT NULL DEFAULT '', -- sha256 of the IDevID certificate's DER, hex
    tls_public   BLOB,                     -- SubjectPublicKeyInfo DER of the LDevID key
    e2e_public   BLOB,
    certificate  BLOB,                     -- the LDevID, PEM: a retry gets this same one
    attempts     INTEGER NOT NULL DEFAULT 0,
    updated_ns   INTEGER NOT NULL,
    PRIMARY KEY (fingerprint, serial)
);
CREATE TABLE IF NOT EXISTS enroll_nonces (
    nonce   BLOB PRIMARY KEY,
    seen_ns INTEGER NOT NULL
);
"""


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@dataclass(frozen=True)
class ManufacturerCA:
    fingerprint: str
    cert: x509.Certificate
    prefix: str
    any_serial: bool
    suite: int


@dataclass(frozen=True)
class Enrollment:
    fingerprint: str
    serial: str
    state: str  # approved | refused
    reason: str
    detail: str
    device_id: str | None
    idevid: str
    tls_public: bytes | None
    e2e_public: bytes | None
    certificate: bytes | None
    attempts: int
    updated_ns: int


class EnrollmentStore:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._db = registry.db
        self._ensure()

    def _ensure(self) -> None:
        db = self._db
        row = db.one("SELECT value FROM meta WHERE name = 'enroll_schema'")
        if row is not None:
            if row[0] != ENROLL_SCHEMA_VERSION:
                raise ProvisioningError(f"registry {self.registry.where} has enrollment schema {row[0]}, "
                                        f"expected {ENROLL_SCHEMA_VERSION}")
            return
        if db.row_locks:  # PostgreSQL: migration 3 made them; a store that opened is at the latest schema
            raise ProvisioningError(f"store {self.registry.where} has no enrollment tables: "
                                    "run 'sgw store migrate'")
        with self.write():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.run(statement)
            db.run("INSERT INTO meta (name, value) VALUES ('enroll_schema', ?) ON CONFLICT (name) DO NOTHING",
                   (ENROLL_SCHEMA_VERSION,))

    def write(self) -> AbstractContextManager[Database]:
        """A write transaction under the registry's write lock, without a generation bump (nothing the
        gateway reads changes), or the caller's `registry.transaction()` when one is open."""
        return self.registry.locked(bump=False)

    # -- the allow-list --------------------------------------------------------------------------

    def allow(self, cert: x509.Certificate, serials: builtins.list[str], *, prefix: str, now_ns: int,
              suite: int | None = None) -> str:
        """Allow-list a CA (again: its prefix must not change) and, optionally, serials; returns its
        fingerprint. With serials, the CA enrols only listed serials; without, any it signs. `suite`
        (first time: default x25519) is what devices enrolled from then on seal with."""
        fp = fingerprint(cert)
        pem = cert.public_bytes(serialization.Encoding.PEM)
        with self.write() as conn:
            row = conn.one("SELECT prefix, any_serial FROM enroll_cas WHERE fingerprint = ?", (fp,))
            if row is None:
                conn.run("INSERT INTO enroll_cas (fingerprint, pem, subject, prefix, any_serial,"
                         " suite, added_ns) VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (fp, pem, cert.subject.rfc4514_string(), prefix, 0 if serials else 1,
                          suites.X25519 if suite is None else suite, now_ns))
            elif str(row[0]) != prefix:
                raise ProvisioningError(f"manufacturer CA {fp[:16]} is allow-listed with prefix {row[0]!r}; "
                                        "remove it first to change the prefix")
            elif serials and int(row[1]):
                conn.run("UPDATE enroll_cas SET any_serial = 0 WHERE fingerprint = ?", (fp,))
            if row is not None and suite is not None:
                conn.run("UPDATE enroll_cas SET suite = ? WHERE fingerprint = ?", (suite, fp))
            for serial in serials:
                conn.run("INSERT INTO enroll_serials (fingerprint, serial, state)"
                         " VALUES (?, ?, 'allowed') ON CONFLICT (fingerprint, serial)"
                         " DO UPDATE SET state = 'allowed', note = ''",
                         (fp, serial))
        return fp

    def refuse_serial(self, fp: str, serial: str, note: str) -> None:
        with self.write() as conn:
            if conn.one("SELECT 1 FROM enroll_cas WHERE fingerprint = ?", (fp,)) is None:
                raise ProvisioningError(f"no allow-listed manufacturer CA {fp[:16]}")
            conn.run("INSERT INTO enroll_serials (fingerprint, serial, state, note)"
                     " VALUES (?, ?, 'refused', ?) ON CONFLICT (fingerprint, serial)"
                     " DO UPDATE SET state = 'refused', note = ?",
                     (fp, serial, note, note))

    def remove_ca(self, fp: str) -> None:
        """Enrolled devices stay registered; new IDevIDs from this CA are refused (untrusted_ca)."""
        with self.write() as conn:
            if conn.run("DELETE FROM enroll_cas WHERE fingerprint = ?", (fp,)) == 0:
                raise ProvisioningError(f"no allow-listed manufacturer CA {fp[:16]}")

    def remove_serial(self, fp: str, serial: str) -> None:
        """Forget a serial: its allow/refuse line and its enrollment record (so it enrols afresh)."""
        with self.write() as conn:
            n = 0
            for table in ("enroll_serials", "enrollments"):
                n += conn.run(f"DELETE FROM {table} WHERE fingerprint = ? AND serial = ?",  # noqa: S608
                              (fp, serial))
            if n == 0:
                raise ProvisioningError(f"serial {serial} is not known for manufacturer CA {fp[:16]}")

    def cas(self) -> builtins.list[ManufacturerCA]:
        rows = self._db.query("SELECT fingerprint, pem, prefix, any_serial, suite FROM enroll_cas"
                              " ORDER BY added_ns, fingerprint")
        return [ManufacturerCA(str(fp), x509.load_pem_x509_certificate(bytes(pem)), str(prefix), bool(anyp),
                               int(suite)) for fp, pem, prefix, anyp, suite in rows]

    def serial_state(self, fp: str, serial: str) -> tuple[str, str] | None:
        row = self._db.one("SELECT state, note FROM enroll_serials WHERE fingerprint = ? AND serial = ?",
                           (fp, serial))
        return None if row is None else (str(row[0]), str(row[1]))

    def serials(self) -> builtins.list[tuple[str, str, str, str]]:
        """(fingerprint, serial, state, note) of every listed serial."""
        return [(str(a), str(b), str(c), str(d)) for a, b, c, d in self._db.query(
            "SELECT fingerprint, serial, state, note FROM enroll_serials ORDER BY fingerprint, serial")]

    # -- requests ---------------------------------------------------------------------------------

    def seen_nonce(self, nonce: bytes, now_ns: int, keep_ns: int) -> bool:
        """Record the nonce; True if it was already there. Entries older than `keep_ns` go: a request
        that old is refused as stale before its nonce is looked at."""
        with self.write() as conn:
            conn.run("DELETE FROM enroll_nonces WHERE seen_ns < ?", (now_ns - keep_ns,))
            added = conn.run("INSERT INTO enroll_nonces (nonce, seen_ns) VALUES (?, ?)"
                             " ON CONFLICT (nonce) DO NOTHING", (nonce, now_ns))
        return added == 0

    def get(self, fp: str, serial: str) -> Enrollment | None:
        row = self._db.one(
            "SELECT fingerprint, serial, state, reason, detail, device_id, idevid, tls_public, e2e_public,"
            " certificate, attempts, updated_ns FROM enrollments WHERE fingerprint = ? AND serial = ?",
            (fp, serial))
        return None if row is None else _enrollment(row)

    def list(self) -> builtins.list[Enrollment]:
        return [_enrollment(r) for r in self._db.query(
            "SELECT fingerprint, serial, state, reason, detail, device_id, idevid, tls_public, e2e_public,"
            " certificate, attempts, updated_ns FROM enrollments ORDER BY fingerprint, serial")]

    def record_refusal(self, fp: str, serial: str, reason: str, detail: str, now_ns: int) -> None:
        """Refusals of a known CA's serial are shown by `sgw enroll list`; an approved record stays
        approved (a refused retry does not undo an identity that was issued)."""
        with self.write() as conn:
            conn.run(
                "INSERT INTO enrollments (fingerprint, serial, state, reason, detail, attempts, updated_ns)"
                " VALUES (?, ?, 'refused', ?, ?, 1, ?) ON CONFLICT (fingerprint, serial) DO UPDATE SET"
                " attempts = enrollments.attempts + 1, updated_ns = excluded.updated_ns,"
                " reason = CASE WHEN enrollments.state = 'refused' THEN excluded.reason"
                " ELSE enrollments.reason END,"
                " detail = CASE WHEN enrollments.state = 'refused' THEN excluded.detail"
                " ELSE enrollments.detail END",
                (fp, serial, reason, detail, now_ns))

    def record_approval(self, fp: str, serial: str, *, device_id: str, idevid: str, tls_public: bytes,
                        e2e_public: bytes, certificate: bytes, now_ns: int) -> None:
        with self.write() as conn:
            conn.run(
                "INSERT INTO enrollments (fingerprint, serial, state, device_id, idevid, tls_public,"
                " e2e_public, certificate, attempts, updated_ns)"
                " VALUES (?, ?, 'approved', ?, ?, ?, ?, ?, 1, ?)"
                " ON CONFLICT (fingerprint, serial) DO UPDATE SET state = 'approved', reason = '',"
                " detail = '',"
                " device_id = excluded.device_id, idevid = excluded.idevid, tls_public = excluded.tls_public,"
                " e2e_public = excluded.e2e_public, certificate = excluded.certificate,"
                " attempts = enrollments.attempts + 1, updated_ns = excluded.updated_ns",
                (fp, serial, device_id, idevid, tls_public, e2e_public, certificate, now_ns))

    def count_retry(self, fp: str, serial: str, now_ns: int) -> None:
        with self.write() as conn:
            conn.run("UPDATE enrollments SET attempts = attempts + 1, updated_ns = ?"
                     " WHERE fingerprint = ? AND serial = ?", (now_ns, fp, serial))


def _enrollment(row: tuple[Any, ...]) -> Enrollment:
    fp, serial, state, reason, detail, dev, idevid, tls, e2e, cert, attempts, updated = row
    return Enrollment(str(fp), str(serial), str(state), str(reason), str(detail),
                      None if dev is None else str(dev), str(idevid),
                      None if tls is None else bytes(tls), None if e2e is None else bytes(e2e),
                      None if cert is None else bytes(cert), int(attempts), int(updated))
