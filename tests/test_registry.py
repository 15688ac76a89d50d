"""The registry: contract API, generation, replay state, concurrency across processes.

Every test that takes `reg` runs against both stores (`store_at`: SQLite and a throwaway PostgreSQL);
the ones about the SQLite file itself (WAL, create-on-open) use it alone."""

from __future__ import annotations

import multiprocessing
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.core.session import DeviceKeys, KeyEntry
from gateway.errors import ProvisioningError
from gateway.registry.store import NewDevice, Registry, write_replay_rows

NOW = 1_800_000_000_000_000_000
PK = bytes(range(32))
PK2 = bytes(range(1, 33))


@pytest.fixture
def reg(store_at: Path | str) -> Iterator[Registry]:
    registry = Registry.open(store_at)
    yield registry
    registry.close()


def _save_replay(reg: Registry, states: dict[str, bytes]) -> None:
    """What the gateway's batch transaction does with the windows (gateway/server/store.py)."""
    with reg.db.write():
        write_replay_rows(reg.db, states)


def _add(reg: Registry, device_id: str, public: bytes = PK, serial: str = "") -> None:
    reg.add_device(device_id, "vibration", public, serial or f"{abs(hash(device_id)):x}", NOW + 10**15)


def test_open_requires_create_for_a_new_file(tmp_path: Path) -> None:
    with pytest.raises(ProvisioningError, match="no registry"):
        Registry.open(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()


def test_wal_and_busy_timeout(tmp_path: Path) -> None:
    Registry.open(tmp_path / "registry.db", create=True).close()
    conn = sqlite3.connect(tmp_path / "registry.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_add_get_list(reg: Registry) -> None:
    _add(reg, "b")
    _add(reg, "a", PK2)
    rec = reg.get("a")
    assert rec is not None
    assert (rec.device_id, rec.kind, rec.status) == ("a", "vibration", "active")
    assert [(k.key_id, k.public, k.not_after_ns) for k in rec.keys] == [(1, PK2, None)]
    assert [r.device_id for r in reg.list()] == ["a", "b"]
    assert reg.get("zzz") is None


def test_duplicate_and_bad_input_change_nothing(reg: Registry) -> None:
    _add(reg, "a")
    gen = reg.generation()
    with pytest.raises(ProvisioningError, match="already exists"):
        _add(reg, "a")
    with pytest.raises(ProvisioningError, match="invalid device id"):
        _add(reg, "a/b")
    with pytest.raises(ProvisioningError, match="32 bytes"):
        reg.add_device("c", "vibration", b"short", "01", NOW)
    # A batch with one bad row adds none of its rows.
    with pytest.raises(ProvisioningError):
        reg.add_devices([NewDevice("x1", "vibration", PK, "x1", NOW),
                         NewDevice("a", "vibration", PK, "x2", NOW)])
    assert reg.get("x1") is None
    assert reg.generation() == gen


def test_device_keys_is_the_core_lookup_shape(reg: Registry) -> None:
    _add(reg, "a")
    keys = reg.snapshot().get("a")
    assert keys == DeviceKeys(status="active", keys={1: KeyEntry(public=PK, not_after_ns=None)})
    assert reg.snapshot().get("nope") is None
    assert reg.snapshot() == {"a": keys}


def test_generation_bumps_on_every_device_write(reg: Registry) -> None:
    seen = [reg.generation()]
    _add(reg, "a")
    seen.append(reg.generation())
    _add(reg, "b")
    seen.append(reg.generation())
    reg.rotate_key("a", PK2, 60, NOW)
    seen.append(reg.generation())
    reg.revoke("a", NOW)
    seen.append(reg.generation())
    reg.remove("b", NOW)
    seen.append(reg.generation())
    assert seen == sorted(set(seen)), seen


def test_revocation_is_visible_to_another_connection(reg: Registry) -> None:
    _add(reg, "a")
    gateway_view = Registry.open(reg.path)
    try:
        before = gateway_view.generation()
        assert gateway_view.snapshot().get("a").status == "active"  # type: ignore[union-attr]
        reg.revoke("a", NOW)
        assert gateway_view.generation() > before
        assert gateway_view.snapshot().get("a").status == "revoked"  # type: ignore[union-attr]
    finally:
        gateway_view.close()


def test_revoke_unknown_or_twice(reg: Registry) -> None:
    with pytest.raises(ProvisioningError, match="unknown device"):
        reg.revoke("a", NOW)
    _add(reg, "a")
    reg.revoke("a", NOW)
    with pytest.raises(ProvisioningError, match="already revoked"):
        reg.revoke("a", NOW)
    with pytest.raises(ProvisioningError, match="revoked"):
        reg.rotate_key("a", PK2, 60, NOW)


def test_rotate_key_grace(reg: Registry) -> None:
    _add(reg, "a")
    assert reg.rotate_key("a", PK2, 100, NOW) == 2
    keys = reg.snapshot().get("a")
    assert keys is not None
    assert keys.keys[1] == KeyEntry(PK, NOW + 100 * 10**9)
    assert keys.keys[2] == KeyEntry(PK2, None)
    # A second rotation with a shorter grace shortens key 1 too; never lengthens it.
    assert reg.rotate_key("a", bytes(32), 10, NOW) == 3
    keys = reg.snapshot().get("a")
    assert keys is not None
    assert keys.keys[1].not_after_ns == NOW + 10 * 10**9
    assert keys.keys[2].not_after_ns == NOW + 10 * 10**9
    assert keys.keys[3].not_after_ns is None


def test_retire_keys_before(reg: Registry) -> None:
    _add(reg, "a")
    reg.rotate_key("a", PK2, 86400, NOW)
    assert reg.retire_keys_before("a", 2, NOW + 5) == 1
    keys = reg.snapshot().get("a")
    assert keys is not None
    assert keys.keys[1].not_after_ns == NOW + 5
    assert keys.keys[2].not_after_ns is None


def test_remove_cascades_and_keeps_cert_revoked(reg: Registry) -> None:
    _add(reg, "a", serial="abc")
    _save_replay(reg, {"a": b"state"})
    reg.remove("a", NOW)
    assert reg.get("a") is None
    assert reg.snapshot().get("a") is None
    assert reg.load_replay() == {}
    assert reg.revoked_certs(NOW) == [("abc", NOW)]
    with pytest.raises(ProvisioningError, match="unknown device"):
        reg.remove("a", NOW)


def test_revoked_certs_respects_time_and_expiry(reg: Registry) -> None:
    _add(reg, "a", serial="aa")
    reg.rotate_key("a", PK2, 100, NOW, new_cert_serial="bb", new_cert_not_after_ns=NOW + 10**15)
    assert reg.revoked_certs(NOW) == []
    assert reg.revoked_certs(NOW + 100 * 10**9) == [("aa", NOW + 100 * 10**9)]
    # Once expired, a certificate needs no CRL entry.
    assert reg.revoked_certs(NOW + 10**15 + 1) == []
    assert reg.get("a").cert_serial == "bb"  # type: ignore[union-attr]


def test_replay_rows_round_trip_without_generation_bump(reg: Registry) -> None:
    _add(reg, "a")
    _add(reg, "b")
    gen = reg.generation()
    _save_replay(reg, {"a": b"\x01" * 300, "b": b"\x02", "gone": b"\x03"})
    _save_replay(reg, {"a": b"\x04"})
    assert reg.load_replay() == {"a": b"\x04", "b": b"\x02"}
    # The gateway's own checkpoints must not make it reload its key cache.
    assert reg.generation() == gen


def _worker(args: tuple[str, int, int]) -> int:
    where, start, count = args
    registry = Registry.open(where if where.startswith("postgresql://") else Path(where))
    try:
        for i in range(start, start + count):
            registry.add_device(f"d{i:05d}", "vibration", i.to_bytes(32, "big"), f"{i:x}", NOW)
            if i % 7 == 0:
                _save_replay(registry, {f"d{i:05d}": b"r"})
    finally:
        registry.close()
    return count


def test_concurrent_writers_in_processes(reg: Registry) -> None:
    jobs = [(str(reg.path), n * 100, 100) for n in range(6)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(6) as pool:
        assert sum(pool.map(_worker, jobs)) == 600
    assert len(reg.list()) == 600
    assert len(reg.snapshot()) == 600
    assert reg.generation() == 600
    if isinstance(reg.path, Path):
        conn = sqlite3.connect(reg.path)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
