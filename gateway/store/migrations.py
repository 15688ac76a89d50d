"""PostgreSQL schema versions, applied in order by `sgw store migrate` and never at a gateway's start-up.

Each migration runs in its own transaction and records itself in `schema_migrations`; an advisory lock
makes two `sgw store migrate` runs at once take turns instead of racing. Opening a store whose newest
recorded version is not LATEST is refused (postgres.py), so a gateway never runs on a schema it was not
written for. The tables mirror the SQLite ones (gateway/registry/store.py, gateway/server/store.py,
gateway/registry/enrollment.py),
with PostgreSQL's types: BIGINT for nanosecond times, BYTEA for keys, windows and payloads. Device ids
collate as "C" (bytewise): the per-batch transaction locks replay rows in ORDER BY device_id, and that
order must not depend on the server's locale (gateway/server/store.py).

SQLite keeps its own scheme: the registry file is created whole by `sgw ca init` (`meta.schema`), and the
gateway adds its tables on open.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "registry, replay windows, pending results, downlink epochs", """
CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
CREATE TABLE devices (
    device_id         TEXT COLLATE "C" PRIMARY KEY,
    kind              TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    cert_serial       TEXT NOT NULL,
    cert_not_after_ns BIGINT NOT NULL,
    created_ns        BIGINT NOT NULL,
    revoked_ns        BIGINT,
    min_suite         INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE keys (
    device_id    TEXT COLLATE "C" NOT NULL REFERENCES devices(device_id) ON DELETE CASCADE,
    key_id       BIGINT NOT NULL,
    public       BYTEA NOT NULL CHECK (length(public) = 32),
    created_ns   BIGINT NOT NULL,
    not_after_ns BIGINT,
    PRIMARY KEY (device_id, key_id)
);
CREATE TABLE certs (
    serial       TEXT PRIMARY KEY,
    device_id    TEXT NOT NULL,
    not_after_ns BIGINT NOT NULL,
    revoked_ns   BIGINT
);
CREATE TABLE replay (
    device_id TEXT COLLATE "C" PRIMARY KEY REFERENCES devices(device_id) ON DELETE CASCADE,
    state     BYTEA NOT NULL
);
CREATE TABLE gateway_pending (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    gateway_id TEXT NOT NULL,
    created_ns BIGINT NOT NULL,
    payload    BYTEA NOT NULL
);
CREATE INDEX gateway_pending_by_gateway ON gateway_pending (gateway_id, id);
CREATE TABLE gateway_downlink (
    gateway_id TEXT PRIMARY KEY,
    epoch      BIGINT NOT NULL
);
-- 'schema' is the registry's own version (gateway/registry/store.py SCHEMA_VERSION: 2 has min_suite).
INSERT INTO meta (name, value) VALUES ('generation', 0), ('schema', 2);
"""),
    Migration(2, "gateway instances: registration and heartbeat (sgw gateway status)", """
CREATE TABLE gateway_instances (
    gateway_id   TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    version      TEXT NOT NULL,
    started_ns   BIGINT NOT NULL,
    heartbeat_ns BIGINT NOT NULL,
    stopped_ns   BIGINT
);
"""),
    Migration(3, "zero-touch enrollment: manufacturer CAs, serials, enrollments, nonces (sgw enroll)", """
CREATE TABLE enroll_cas (
    fingerprint TEXT PRIMARY KEY,
    pem         BYTEA NOT NULL,
    subject     TEXT NOT NULL,
    prefix      TEXT NOT NULL,
    any_serial  INTEGER NOT NULL,
    suite       INTEGER NOT NULL DEFAULT 1,
    added_ns    BIGINT NOT NULL
);
CREATE TABLE enroll_serials (
    fingerprint TEXT NOT NULL REFERENCES enroll_cas(fingerprint) ON DELETE CASCADE,
    serial      TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('allowed', 'refused')),
    note        TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (fingerprint, serial)
);
CREATE TABLE enrollments (
    fingerprint  TEXT NOT NULL,
    serial       TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('approved', 'refused')),
    reason       TEXT NOT NULL DEFAULT '',
    detail       TEXT NOT NULL DEFAULT '',
    device_id    TEXT,
    idevid       TEXT NOT NULL DEFAULT '',
    tls_public   BYTEA,
    e2e_public   BYTEA,
    certificate  BYTEA,
    attempts     INTEGER NOT NULL DEFAULT 0,
    updated_ns   BIGINT NOT NULL,
    PRIMARY KEY (fingerprint, serial)
);
CREATE TABLE enroll_nonces (
    nonce   BYTEA PRIMARY KEY,
    seen_ns BIGINT NOT NULL
);
-- gateway/registry/enrollment.py ENROLL_SCHEMA_VERSION
INSERT INTO meta (name, value) VALUES ('enroll_schema', 1);
"""),
)

LATEST = MIGRATIONS[-1].version
# pg_advisory_xact_lock key that serialises concurrent migrations ("sgw" in ASCII).
LOCK_KEY = 0x736777
