"""Moving a fleet from the embedded SQLite store to PostgreSQL (`sgw store copy`).

Everything a gateway tier needs to go on where it stopped is copied in one PostgreSQL transaction: the
registry (devices, keys, certificates), the replay windows (without them a window delivered before the
move would be accepted again after it), results not yet confirmed by the broker (republished by the
instance that owns them when it starts on the new store), each instance's downlink epoch (devices refuse
an older one) and the enrollment tables when both stores have them. Not copied: `gateway_instances`
(each instance registers itself at start) and `meta` rows other than `generation`, which the target
gets one past the source's so a gateway still polling the old number reloads.

The target must be migrated (`sgw store migrate`) and hold no device: copying into a fleet that is
already in use would merge two registries, which is not what anyone means by moving one. Columns are
the ones both schemas have (SQLite adds columns in place as the registry's schema grows; the
migrations add them on PostgreSQL), so a column one side lacks is named in the refusal, not dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.errors import ProvisioningError
from gateway.store.base import Database, chunks, marks

# In foreign-key order (devices before what references them; CAs before their serials).
TABLES: tuple[str, ...] = (
    "devices", "keys", "certs", "replay", "gateway_pending", "gateway_downlink",
    "enroll_cas", "enroll_serials", "enrollments", "enroll_nonces",
)
# Copied without these columns: the target numbers its own rows (order is kept).
GENERATED = {"gateway_pending": ("id",)}
BATCH = 500  # rows per pipelined INSERT batch


@dataclass
class CopyResult:
    source: str
    target: str
    rows: dict[str, int] = field(default_factory=dict)
    generation: int = 0


def _sqlite_columns(db: Database, table: str) -> list[str] | None:
    rows = db.query(f"PRAGMA table_info({table})")
    return [str(r[1]) for r in rows] or None


def _pg_columns(db: Database, table: str) -> list[str] | None:
    rows = db.query("SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema()"
                    " AND table_name = ? ORDER BY ordinal_position", (table,))
    return [str(r[0]) for r in rows] or None


def copy_store(source: Database, target: Database) -> CopyResult:
    """Copy a SQLite store (`source`) into an empty migrated PostgreSQL store (`target`), all or nothing."""
    res = CopyResult(source.where, target.where)
    plan: list[tuple[str, list[str]]] = []
    for table in TABLES:
        have, want = _sqlite_columns(source, table), _pg_columns(target, table)
        if have is None:
            continue  # e.g. no enrollment tables yet: nothing to copy
        if want is None:
            raise ProvisioningError(f"{target.where} has no table {table} ({source.where} has it): "
                                    "upgrade sgw and run 'sgw store migrate' there first")
        skip = GENERATED.get(table, ())
        lacking = [c for c in have if c not in want and c not in skip]
        if lacking:
            raise ProvisioningError(f"{target.where}: table {table} lacks column(s) {', '.join(lacking)}: "
                                    "run 'sgw store migrate' there first")
        plan.append((table, [c for c in have if c not in skip]))
    with source.read(), target.write():
        held = target.one("SELECT count(*) FROM devices")
        if held and int(held[0]):
            raise ProvisioningError(f"{target.where} already holds {held[0]} device(s); copy needs an empty "
                                    "store (a new database, migrated)")
        for table, cols in plan:
            names = ", ".join(cols)
            order = " ORDER BY id" if "id" in GENERATED.get(table, ()) else ""
            rows = source.query(f"SELECT {names} FROM {table}{order}")  # noqa: S608 - names from TABLES
            for part in chunks(rows, BATCH):
                target.run_many(f"INSERT INTO {table} ({names}) VALUES ({marks(len(cols))})",  # noqa: S608
                                part)
            res.rows[table] = len(rows)
        gen = source.one("SELECT value FROM meta WHERE name = 'generation'")
        res.generation = (int(gen[0]) if gen else 0) + 1
        target.run("UPDATE meta SET value = ? WHERE name = 'generation'", (res.generation,))
    return res
