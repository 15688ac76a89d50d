"""The gateway tier, as the store sees it: every instance registers itself at start (host, pid, version)
and heartbeats, so `sgw gateway status` on any host lists every instance sharing the store and whether
it is running, stopped cleanly, or silent (its process died or lost the store).

The rows are written from the service's asyncio thread through the Registry's connection, never from the
network thread: the result store's connection is the network thread's alone (a SQLite connection shared
by two threads would mix their transactions). SQLite gets the table with the gateway's other tables
(server/store.py), PostgreSQL from migration 2.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from gateway.store.base import Database

HEARTBEAT_S = 5.0
SILENT_AFTER_S = 3 * HEARTBEAT_S  # three missed heartbeats

RUNNING = "running"
STOPPED = "stopped"
SILENT = "silent"


@dataclass(frozen=True)
class Instance:
    gateway_id: str
    host: str
    pid: int
    version: str
    started_ns: int
    heartbeat_ns: int
    stopped_ns: int | None

    def state(self, now_ns: int) -> str:
        if self.stopped_ns is not None:
            return STOPPED
        return RUNNING if now_ns - self.heartbeat_ns <= SILENT_AFTER_S * 1e9 else SILENT

    def to_json(self, now_ns: int) -> dict[str, object]:
        return {"id": self.gateway_id, "state": self.state(now_ns), "host": self.host, "pid": self.pid,
                "version": self.version, "started_ns": self.started_ns, "heartbeat_ns": self.heartbeat_ns,
                "heartbeat_age_s": round(max(0, now_ns - self.heartbeat_ns) / 1e9, 1),
                "stopped_ns": self.stopped_ns}


def register(db: Database, gateway_id: str, *, host: str, pid: int, version: str, now_ns: int) -> None:
    db.run("INSERT INTO gateway_instances (gateway_id, host, pid, version, started_ns, heartbeat_ns,"
           " stopped_ns) VALUES (?, ?, ?, ?, ?, ?, NULL) ON CONFLICT (gateway_id) DO UPDATE SET"
           " host = excluded.host, pid = excluded.pid, version = excluded.version,"
           " started_ns = excluded.started_ns, heartbeat_ns = excluded.heartbeat_ns, stopped_ns = NULL",
           (gateway_id, host, pid, version, now_ns, now_ns))


def heartbeat(db: Database, gateway_id: str, now_ns: int) -> None:
    db.run("UPDATE gateway_instances SET heartbeat_ns = ? WHERE gateway_id = ?", (now_ns, gateway_id))


def stopped(db: Database, gateway_id: str, now_ns: int) -> None:
    db.run("UPDATE gateway_instances SET stopped_ns = ?, heartbeat_ns = ? WHERE gateway_id = ?",
           (now_ns, now_ns, gateway_id))


def tier(db: Database) -> list[Instance]:
    try:
        rows = db.query("SELECT gateway_id, host, pid, version, started_ns, heartbeat_ns, stopped_ns"
                        " FROM gateway_instances ORDER BY gateway_id")
    except sqlite3.OperationalError:
        return []  # a SQLite registry no gateway of this version has opened yet: no table, no instances
    return [Instance(str(g), str(h), int(p), str(v), int(s), int(b), None if x is None else int(x))
            for g, h, p, v, s, b, x in rows]
