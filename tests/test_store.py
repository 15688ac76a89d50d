"""The shared store on PostgreSQL: migrations and the refusal to run on an old schema, the per-batch row
locks (two instances racing one window make one result; a replay via the other instance is refused),
and `sgw ca`/`sgw device`/`sgw gateway` on one PostgreSQL store.

The store behaviour both implementations share runs against both in test_registry.py and
test_gateway_units.py (`store_at`); this file is what only a server with concurrent writers can show.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gateway.core.results import result_batch
from gateway.registry.enrollment import EnrollmentStore
from gateway.registry.store import Registry
from gateway.server.store import Key, ResultStore
from gateway.store.base import StoreError
from gateway.store.migrations import LATEST
from gateway.store.postgres import migrate, schema_version
from tests.support.cli import run_cli
from tests.support.gateway import (
    Device,
    Env,
    GatewayProc,
    assert_one_result_per_window,
    gateway_config,
    metric,
)
from tests.support.idevid import Manufacturer
from tests.support.mosquitto import disconnect, free_port, start_broker
from tests.support.postgres import PgCluster, missing_reason
from tests.support.provision import add_instance, provision

pytestmark = pytest.mark.skipif(missing_reason() is not None, reason=missing_reason() or "")

NOW = 1_800_000_000_000_000_000
WAIT_S = 60  # bound on waiting for another session to block on a lock (never an assertion on time)


@pytest.fixture
def store(pg_url: str) -> str:
    with Registry.open(pg_url) as reg:
        for d in ("dev-a", "dev-b", "dev-c"):
            reg.add_device(d, "vibration", bytes(32), f"serial-{d}", NOW + 10**18)
    return pg_url


@pytest.fixture
def instances(store: str) -> Iterator[tuple[ResultStore, ResultStore]]:
    """Two gateway instances' result stores, each with its own pool, as if on two hosts."""
    a, b = ResultStore(store, "gw-1"), ResultStore(store, "gw-2")
    yield a, b
    a.close()
    b.close()


# -- migrations ----------------------------------------------------------------------------------------


def test_migrate_applies_once_and_reports(pg_cluster: PgCluster) -> None:
    url = pg_cluster.new_database()
    rc, out, err = run_cli(["store", "status", "--url", url, "--json"])
    assert rc == 0, err
    assert json.loads(out) | {"where": ""} == {"store": "postgresql", "where": "", "version": 0,
                                                "latest": LATEST, "current": False}
    rc, out, err = run_cli(["store", "migrate", "--url", url, "--json"])
    assert rc == 0, err
    doc = json.loads(out)
    assert (doc["before"], doc["after"], doc["applied"]) == (0, LATEST, list(range(1, LATEST + 1)))
    assert "@" in doc["where"] and url.rsplit("/", 1)[1] in doc["where"]
    rc, out, _ = run_cli(["store", "migrate", "--url", url])
    assert rc == 0 and "up to date" in out
    assert schema_version(url) == LATEST


def test_concurrent_migrations_take_turns(pg_cluster: PgCluster) -> None:
    url = pg_cluster.new_database()
    results: list[tuple[int, ...]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(migrate(url).applied)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert not errors, errors
    # Each migration is its own transaction under the migration lock: every one is applied exactly once,
    # by whichever run got there first (one run may apply 1 and another 2).
    applied = [v for r in results for v in r]
    assert len(results) == 4 and sorted(applied) == list(range(1, LATEST + 1)), results
    assert schema_version(url) == LATEST


def test_an_unmigrated_or_newer_store_is_refused_with_the_fix(pg_cluster: PgCluster) -> None:
    url = pg_cluster.new_database()
    with pytest.raises(StoreError, match=r"schema version 0, this sgw needs \d+: run 'sgw store migrate'"):
        Registry.open(url)
    with pytest.raises(StoreError, match="run 'sgw store migrate'"):
        ResultStore(url, "gw-1")
    migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES (%s, 'from the future', 0)", (LATEST + 1,))
    with pytest.raises(StoreError, match="newer than this sgw knows"):
        Registry.open(url)


def test_unreachable_store_is_one_line_without_the_password(pg_cluster: PgCluster) -> None:
    rc, _, err = run_cli(["store", "status", "--url", "postgresql://sgw:hunter2@127.0.0.1:1/none"])
    assert rc == 2 and err.count("\n") == 1 and "cannot connect" in err
    assert "hunter2" not in err


# -- exactly once across instances ---------------------------------------------------------------------


def _waiting_on_lock(url: str) -> int:
    """Sessions of this database blocked on a lock right now (pg_stat_activity)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                           " AND wait_event_type = 'Lock'").fetchone()
    return int(row[0]) if row else 0


def _wait_until(cond: Callable[[], bool]) -> None:
    done = threading.Event()
    for _ in range(WAIT_S * 20):
        if cond():
            return
        done.wait(0.05)
    raise TimeoutError("condition not reached")


def _hold_inside(monkeypatch: pytest.MonkeyPatch, gateway_id: str, inside: threading.Event,
                 release: threading.Event) -> None:
    """Make `gateway_id`'s next batch transaction wait between its replay-row reads and its writes (where
    it frames the kept results), as a slow or stopped instance would, until `release` is set."""
    from gateway.server import store as result_store

    frame = result_store.result_batch

    def held(gid: str, results: list[bytes]) -> bytes:
        if gid == gateway_id and not inside.is_set():
            inside.set()
            release.wait(WAIT_S)
        return frame(gid, results)

    monkeypatch.setattr(result_store, "result_batch", held)


@pytest.mark.parametrize("first", [True, False], ids=["device-first-window", "device-with-state"])
def test_same_window_on_two_instances_makes_one_result(
    store: str, instances: tuple[ResultStore, ResultStore], first: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Instance 1 holds its batch transaction open (after its reads); instance 2 commits the same window
    meanwhile: it must wait on the row lock, then see instance 1's window and drop the item. For a
    device's first window there is no row to lock yet: the empty row inserted first is what waits."""
    gw1, gw2 = instances
    if not first:  # both rows exist: only SELECT ... FOR UPDATE can make gw2 wait
        gw1.commit([("dev-a", 1, 0, 1), ("dev-b", 1, 0, 1)], [b"earlier"] * 2, NOW)
    window: list[Key] = [("dev-a", 1, 5, 1), ("dev-b", 1, 5, 1)]
    inside, release = threading.Event(), threading.Event()
    out: dict[str, tuple[int | None, list[bool], bytes | None]] = {}

    _hold_inside(monkeypatch, "gw-1", inside, release)

    def one() -> None:
        out["gw1"] = gw1.commit(window, [b"r1"] * 2, NOW)

    def two() -> None:
        out["gw2"] = gw2.commit(list(reversed(window)), [b"r2"] * 2, NOW)

    t1 = threading.Thread(target=one)
    t1.start()
    assert inside.wait(WAIT_S)
    t2 = threading.Thread(target=two)
    t2.start()
    _wait_until(lambda: _waiting_on_lock(store) >= 1)  # gw2 is blocked on gw1's row locks
    release.set()
    t1.join(WAIT_S)
    t2.join(WAIT_S)
    assert out["gw1"][1:] == ([True, True], result_batch("gw-1", [b"r1"] * 2))
    assert out["gw2"] == (None, [False, False], None)
    assert [p for _, p in gw2.pending()] == []
    # A replay of one of those windows sent later to either instance is refused there too.
    for gw in (gw1, gw2):
        assert gw.commit([("dev-b", 1, 5, 1)], [b"x"], NOW)[1] == [False]


def test_a_frozen_instance_does_not_hold_the_others_locks(
    store: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An instance stopped inside its batch transaction (SIGSTOP, a hung host): the server ends its
    session after the idle-in-transaction timeout, the other instance gets the rows and the window, and
    the frozen one's commit fails (it exits and is restarted; its inputs are redelivered as replays)."""
    from gateway.store import postgres

    monkeypatch.setattr(postgres, "IDLE_IN_TRANSACTION_TIMEOUT_MS", 300)
    gw1, gw2 = ResultStore(store, "gw-1"), ResultStore(store, "gw-2")
    window: list[Key] = [("dev-a", 1, 7, 1)]
    inside, release = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    _hold_inside(monkeypatch, "gw-1", inside, release)  # "stopped" until the other has committed

    def one() -> None:
        try:
            gw1.commit(window, [b"never"], NOW)
        except StoreError as exc:
            failed.append(exc)

    t1 = threading.Thread(target=one)
    t1.start()
    try:
        assert inside.wait(WAIT_S)
        _pid, keep, payload = gw2.commit(window, [b"r2"], NOW)
        assert (keep, payload) == ([True], result_batch("gw-2", [b"r2"]))
    finally:
        release.set()
        t1.join(WAIT_S)
    assert len(failed) == 1 and "store" in str(failed[0])
    assert gw1.pending() == [] and [p for _, p in gw2.pending()] == [result_batch("gw-2", [b"r2"])]
    # The frozen instance, back (a fresh pool connection), finds the window taken: a replay.
    assert gw1.commit(window, [b"x"], NOW)[1] == [False]
    gw1.close()
    gw2.close()


def test_racing_instances_process_each_window_once(store: str) -> None:
    """Four instances commit overlapping random batches of the same 600 windows at once: each window is
    kept by exactly one of them, and no transaction deadlocks (locks are taken in device-id order)."""
    windows: list[Key] = [(d, 1, c, 1) for d in ("dev-a", "dev-b", "dev-c") for c in range(200)]
    stores = [ResultStore(store, f"gw-{i}") for i in range(4)]
    kept: list[list[Key]] = [[] for _ in stores]
    errors: list[BaseException] = []
    start = threading.Barrier(len(stores))

    def worker(i: int) -> None:
        rng = random.Random(i)
        mine = windows[:]
        rng.shuffle(mine)
        start.wait(WAIT_S)
        try:
            for at in range(0, len(mine), 16):
                batch = mine[at:at + 16]
                _pid, keep, _ = stores[i].commit(batch, [b"r"] * len(batch), NOW)
                kept[i].extend(key for key, k in zip(batch, keep, strict=True) if k)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S * 5)
    for s in stores:
        s.close()
    assert not errors, errors
    every = [k for ks in kept for k in ks]
    assert len(every) == len(windows) and set(every) == set(windows)


def test_downlink_epochs_stay_increasing_per_instance(instances: tuple[ResultStore, ResultStore]) -> None:
    gw1, gw2 = instances
    assert gw1.next_downlink_epoch(1000) == 1000
    assert gw1.next_downlink_epoch(10) == 1001  # the clock went back: still above the last
    assert gw2.next_downlink_epoch(10) == 10  # per instance


# -- the commands on one PostgreSQL store --------------------------------------------------------------


def _home_on(tmp_path: Path, url: str, broker_port: int = 8883) -> Path:
    prov = provision(tmp_path / "home", [], broker_port=broker_port)
    toml = prov.gateway_toml
    toml.write_text(toml.read_text().replace('[store]\nurl = ""', f'[store]\nurl = "{url}"'))
    return prov.home


def test_ca_and_device_commands_write_the_postgresql_store(tmp_path: Path, pg_url: str) -> None:
    home = _home_on(tmp_path, pg_url)
    provision(home, ["dev-1", "dev-2"])
    with Registry.open(pg_url) as reg:
        assert [r.device_id for r in reg.list()] == ["dev-1", "dev-2"]
    rc, _, err = run_cli(["device", "revoke", "dev-2", "--dir", str(home)])
    assert rc == 0, err
    with Registry.open(pg_url) as reg:
        assert reg.get("dev-2").status == "revoked"  # type: ignore[union-attr]
    with Registry.open(home / "registry.db") as local:
        assert local.list() == []  # the SQLite file `sgw ca init` made stays unused
    # An added instance's config names the same store.
    rc, _, err = run_cli(["gateway", "add-instance", "gw-2", "--dir", str(home)])
    assert rc == 0, err
    assert f'url = "{pg_url}"' in (home / "gateway-gw-2.toml").read_text()
    rc, out, _ = run_cli(["store", "status", "--dir", str(home), "--json"])
    assert rc == 0 and json.loads(out)["current"] is True


def test_copy_moves_a_sqlite_fleet_to_postgresql_whole(tmp_path: Path, pg_url: str) -> None:
    """`sgw store copy`: registry, replay windows and unconfirmed results arrive together, so a window the
    SQLite tier already processed is a replay on PostgreSQL and its result is still owed; a second copy,
    a running gateway and an unmigrated target are refused in one line and change nothing."""
    from gateway.server import tier

    prov = provision(tmp_path / "home", ["dev-1", "dev-2"])
    home = prov.home
    rc, _, err = run_cli(["device", "rotate", "dev-2", "--dir", str(home)])
    assert rc == 0, err
    local = ResultStore(home / "registry.db", "gw-1")
    pending_id, keep, _ = local.commit([("dev-1", 1, 7, 1)], [b"result-7"], NOW)
    assert keep == [True] and pending_id is not None
    tier.register(local.db, "gw-1", host="h", pid=1, version="t", now_ns=NOW)
    tier.stopped(local.db, "gw-1", NOW)
    local.close()
    acme = Manufacturer.create(tmp_path / "acme", "Acme Devices CA")
    with Registry.open(home / "registry.db") as src:
        EnrollmentStore(src).allow(acme.cert, ["SN-1"], prefix="acme-", now_ns=NOW)
        before = [(r.device_id, r.status, r.cert_serial, [(k.key_id, k.public) for k in r.keys])
                  for r in src.list()]
        generation = src.db.one("SELECT value FROM meta WHERE name = 'generation'")

    rc, out, err = run_cli(["store", "copy", "--dir", str(home), "--to", pg_url, "--switch", "--json"])
    assert rc == 0, err
    report = json.loads(out)
    assert report["rows"]["devices"] == 2 and report["rows"]["keys"] == 3 and report["rows"]["replay"] == 1
    assert report["rows"]["gateway_pending"] == 1
    assert report["switched"] == [str(home / "gateway.toml")]
    assert f'url = "{pg_url}"' in (home / "gateway.toml").read_text()
    assert "--password" not in out and "registry.db" in report["source"]

    with Registry.open(pg_url) as reg:
        after = [(r.device_id, r.status, r.cert_serial, [(k.key_id, k.public) for k in r.keys])
                 for r in reg.list()]
        assert after == before
        assert generation is not None
        assert reg.db.one("SELECT value FROM meta WHERE name = 'generation'") == (generation[0] + 1,)
        enrollment = EnrollmentStore(reg)  # the allow-list came along
        assert [(c.cert, c.prefix, c.any_serial) for c in enrollment.cas()] == [(acme.cert, "acme-", False)]
        assert [row[1:3] for row in enrollment.serials()] == [("SN-1", "allowed")]
    moved = ResultStore(pg_url, "gw-1")
    try:
        # still owed: republished at start
        assert [p for _, p in moved.pending()] == [result_batch("gw-1", [b"result-7"])]
        _, keep, _ = moved.commit([("dev-1", 1, 7, 1), ("dev-1", 1, 8, 1)], [b"x"] * 2, NOW)
        assert keep == [False, True]  # the window SQLite recorded is a replay here
    finally:
        moved.close()

    # Again into the same (now non-empty) store: refused, nothing written.
    rc, out, err = run_cli(["store", "copy", "--dir", str(home), "--to", pg_url])
    assert rc != 0 and "already holds 2 device(s)" in err and len(err.strip().splitlines()) == 1
    # A gateway still heartbeating on the SQLite store: refused before anything is read.
    with Registry.open(home / "registry.db") as src:
        tier.register(src.db, "gw-9", host="h", pid=1, version="t", now_ns=time.time_ns())
    rc, _, err = run_cli(["store", "copy", "--dir", str(home), "--to", pg_url])
    assert rc != 0 and "gateway gw-9 on h is running" in err
    with Registry.open(home / "registry.db") as src:
        tier.stopped(src.db, "gw-9", time.time_ns())


def test_copy_refuses_an_unmigrated_target_with_the_fix(tmp_path: Path, pg_cluster: PgCluster) -> None:
    home = provision(tmp_path / "home", ["dev-1"]).home
    url = pg_cluster.new_database()
    rc, _, err = run_cli(["store", "copy", "--dir", str(home), "--to", url, "--switch"])
    assert rc != 0 and "run 'sgw store migrate'" in err and len(err.strip().splitlines()) == 1
    assert 'url = ""' in (home / "gateway.toml").read_text()  # --switch changed nothing


def test_gateway_refuses_an_unmigrated_store_in_one_line(tmp_path: Path, pg_cluster: PgCluster) -> None:
    url = pg_cluster.new_database()
    home = _home_on(tmp_path, url)
    rc, _, err = run_cli(["gateway", "--config", str(home / "gateway.toml")])
    assert rc == 2, err
    assert err.count("\n") == 1 and "run 'sgw store migrate'" in err
    assert schema_version(url) == 0  # refused, not migrated behind the operator's back


# -- two gateway processes on one PostgreSQL -----------------------------------------------------------


def _total(gws: list[GatewayProc], name: str, **labels: str) -> float:
    out = 0.0
    for gw in gws:
        value = metric(gw.scrape(), name, **labels)
        out += 0.0 if value != value else value  # nan: no sample yet
    return out


@contextlib.contextmanager
def _pg_env(tmp_path: Path, url: str, devices: list[str]) -> Iterator[Env]:
    """A home whose store is `url`, its devices provisioned into it, a running broker; every gateway and
    client started through the Env is stopped on exit, and each gateway must have exited 0 (or been
    SIGKILLed by the test)."""
    port = free_port()
    home = _home_on(tmp_path, url, port)
    prov = provision(home, devices, broker_port=port)
    broker = start_broker(prov.home, tmp_path / "broker", port=port)
    env = Env(prov, broker, tmp_path)
    try:
        yield env
    finally:
        codes = [gw.stop() for gw in env.gateways]
        for c in env.clients:
            disconnect(c.client)
        broker.stop()
    for gw, code in zip(env.gateways, codes, strict=True):
        assert gw.killed or code == 0, f"gateway exit {code}:\n{gw.log()[-2000:]}"


@pytest.mark.slow
def test_two_gateways_sharing_postgresql_give_each_window_one_result(tmp_path: Path, pg_url: str) -> None:
    """gw-1 and gw-2 in different share groups, so the broker hands every window to both, as if each
    were a host that got it redelivered: one result per window in all, the other instance drops it as a
    replay at commit; an envelope sent again reaches both and both refuse it."""
    with _pg_env(tmp_path, pg_url, ["dev-1", "dev-2"]) as env:
        prov, broker, home = env.prov, env.broker, env.prov.home
        gw1 = env.gateway("gw-1")
        add_instance(prov, "gw-2")
        broker.reload()
        p2 = free_port()
        conf = gateway_config(prov, "gw-2.toml", gateway_id="gw-2", metrics_port=p2)
        conf.write_text(conf.read_text().replace('share_group = "sgw"', 'share_group = "sgw-b"'))
        gw2 = GatewayProc(conf, p2, tmp_path / "gw-2.log")
        env.gateways.append(gw2)
        gw2.start()
        gws = [gw1, gw2]
        obs = env.observer()
        sent: set[tuple[str, int, int]] = set()
        captured: list[tuple[str, bytes]] = []
        devices = {}
        for device_id in ("dev-1", "dev-2"):
            dev = devices[device_id] = env.device(device_id)
            publish = dev.client.publish

            def record(topic: str, payload: bytes, qos: int = 0, _p: Any = publish, **kw: Any) -> Any:
                captured.append((topic, payload))
                return _p(topic, payload, qos=qos, **kw)

            dev.client.publish = record  # type: ignore[method-assign]
            sent |= set(dev.publish(40))
        assert obs.wait_for(sent, 60) == set()
        _wait_until(lambda: _total(gws, "sgw_gateway_rejections_total", reason="replay") >= len(sent))
        assert _total(gws, "sgw_gateway_results_total") == len(sent)
        assert _total(gws, "sgw_gateway_rejections_total", reason="replay") == len(sent)
        assert_one_result_per_window(obs, sent)
        # Replays: each envelope again (from its own device: the ACL allows nothing else), to both
        # instances; refused by both, no further result.
        for topic, payload in captured[:5] + captured[-5:]:
            devices[topic.split("/")[3]].client.publish(topic, payload, qos=1).wait_for_publish(30)
        _wait_until(lambda: _total(gws, "sgw_gateway_rejections_total", reason="replay") >= len(sent) + 20)
        assert _total(gws, "sgw_gateway_results_total") == len(sent)
        assert_one_result_per_window(obs, sent)
        # The tier as the store sees it, from the home (as from any host sharing the store).
        rc, out, err = run_cli(["gateway", "status", "--dir", str(home), "--json"])
        assert rc == 0, err
        assert [(i["id"], i["state"]) for i in json.loads(out)["instances"]] == [
            ("gw-1", "running"), ("gw-2", "running")]
        rc, out, err = run_cli(["gateway", "instances", "--dir", str(home), "--json"])
        assert rc == 0, err
        assert [(i["id"], i["state"]) for i in json.loads(out)] == [("gw-1", "running"), ("gw-2", "running")]
        assert gw2.stop() == 0
        rc, out, _ = run_cli(["gateway", "status", "--dir", str(home), "--json"])
        assert [(i["id"], i["state"]) for i in json.loads(out)["instances"]] == [
            ("gw-1", "running"), ("gw-2", "stopped")]


@pytest.mark.slow
def test_an_instance_killed_mid_stream_on_postgresql_loses_and_duplicates_nothing(
    tmp_path: Path, pg_url: str,
) -> None:
    """gw-1 and gw-2 share one group and one PostgreSQL store; gw-2 is SIGKILLed mid-stream and
    restarted: every window still has exactly one distinct result (deliveries may repeat)."""
    with _pg_env(tmp_path, pg_url, ["dev-1", "dev-2", "dev-3"]) as env:
        obs = env.observer()
        env.gateway("gw-1")
        victim = env.gateway("gw-2")
        devices = [env.device(d) for d in ("dev-1", "dev-2", "dev-3")]
        sent: set[tuple[str, int, int]] = set()
        lock = threading.Lock()
        stop = threading.Event()

        def traffic(d: Device) -> None:
            while not stop.is_set() and len(d.sent) < 400:
                batch = d.publish(20, pace_s=0.01)
                with lock:
                    sent.update(batch)

        threads = [threading.Thread(target=traffic, args=(d,)) for d in devices]
        for t in threads:
            t.start()
        try:
            _wait_until(lambda: len(obs.keys()) >= 300)
            victim.kill()
            restarted = GatewayProc(victim.config, victim.metrics_port, victim.log_path)
            env.gateways.append(restarted)
            restarted.start()
        finally:
            for t in threads:
                t.join(WAIT_S)
            stop.set()
        assert len(sent) == 1200
        assert obs.wait_for(sent, WAIT_S) == set(), restarted.log()[-3000:]
        assert_one_result_per_window(obs, sent)
