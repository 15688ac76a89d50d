"""Gateway edges without a broker: the durable result store (on SQLite and on PostgreSQL), the metrics
exposition, the config schema."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from gateway.core.reasons import Reason
from gateway.core.replay import ReplayWindow
from gateway.core.results import result_batch
from gateway.errors import ConfigError
from gateway.registry.store import Registry
from gateway.server import tier
from gateway.server.config import for_worker, load_config
from gateway.server.metrics import GatewayStats, make_registry
from gateway.server.store import ResultStore
from tests.support.cli import run_cli
from tests.support.provision import provision

NOW = 1_800_000_000_000_000_000


@pytest.fixture
def registry_db(store_at: Path | str) -> Path | str:
    """Two devices in a store of each kind: the result-store tests run on SQLite and on PostgreSQL."""
    with Registry.open(store_at) as reg:
        for d in ("dev-a", "dev-b"):
            reg.add_device(d, "vibration", bytes(32), f"serial-{d}", NOW + 10**18)
    return store_at


def test_commit_stores_windows_and_pending_results_together(registry_db: Path | str) -> None:
    store = ResultStore(registry_db, "gw-1")
    keys = [("dev-a", 5, 0, 1), ("dev-a", 5, 1, 1), ("dev-b", 7, 3, 2)]
    pid, keep, payload = store.commit(keys, [b"r0", b"r1", b"r2"], NOW)
    batch = result_batch("gw-1", [b"r0", b"r1", b"r2"])
    assert keep == [True, True, True] and payload == batch and pid is not None
    assert store.pending() == [(pid, batch)]
    with Registry.open(registry_db) as reg:
        states = reg.load_replay()
    a = ReplayWindow.from_bytes(states["dev-a"])
    assert (a.epoch, a.top) == (5, 1) and a.check(5, 0) is Reason.REPLAY and a.check(5, 2) is None
    assert ReplayWindow.from_bytes(states["dev-b"]).key_floor == 2
    store.published(pid)
    assert store.pending() == [(pid, batch)]  # deleted with the next transaction, or by purge()
    store.purge()
    assert store.pending() == []
    store.close()


def test_a_second_instance_drops_what_the_first_already_committed(registry_db: Path | str) -> None:
    """Two gateways on one shared subscription: a redelivery to the other instance gets no second result."""
    gw1, gw2 = ResultStore(registry_db, "gw-1"), ResultStore(registry_db, "gw-2")
    gw1.commit([("dev-a", 1, 10, 1), ("dev-a", 1, 11, 1)], [b"a10", b"a11"], NOW)
    _pid, keep, payload = gw2.commit([("dev-a", 1, 11, 1), ("dev-a", 1, 12, 1), ("dev-b", 1, 0, 1)],
                                     [b"a11", b"a12", b"b0"], NOW)
    assert keep == [False, True, True]
    assert payload == result_batch("gw-2", [b"a12", b"b0"])  # the already-processed one gets no result
    # A batch made only of already-processed items stores nothing and publishes nothing.
    pid, keep, payload = gw2.commit([("dev-a", 1, 10, 1)], [b"a10"], NOW)
    assert (pid, keep, payload) == (None, [False], None)
    # Each instance republishes only its own pending rows after a restart.
    assert [p for _, p in gw1.pending()] == [result_batch("gw-1", [b"a10", b"a11"])]
    assert [p for _, p in gw2.pending()] == [result_batch("gw-2", [b"a12", b"b0"])]
    gw1.close()
    gw2.close()


def test_the_tier_lists_registered_instances(registry_db: Path | str) -> None:
    ResultStore(registry_db, "gw-1").close()  # the gateway's tables (SQLite makes them on open)
    with Registry.open(registry_db) as reg:
        assert tier.tier(reg.db) == []
        tier.register(reg.db, "gw-1", host="host-a", pid=11, version="1.0", now_ns=NOW)
        tier.register(reg.db, "gw-2", host="host-b", pid=22, version="1.0", now_ns=NOW)
        tier.heartbeat(reg.db, "gw-2", NOW + 20 * 10**9)
        tier.stopped(reg.db, "gw-1", NOW + 10**9)
        rows = tier.tier(reg.db)
        later = NOW + 21 * 10**9
        assert [(r.gateway_id, r.host, r.pid, r.state(later)) for r in rows] == [
            ("gw-1", "host-a", 11, "stopped"), ("gw-2", "host-b", 22, "running")]
        assert rows[1].state(NOW + 20 * 10**9 + int(tier.SILENT_AFTER_S * 1e9) + 1) == "silent"
        # A restart registers again: running, no longer stopped.
        tier.register(reg.db, "gw-1", host="host-c", pid=33, version="1.1", now_ns=later)
        assert tier.tier(reg.db)[0].state(later) == "running"


def test_a_survivor_takes_over_what_a_silent_instance_left_once(registry_db: Path | str) -> None:
    """Results a dead instance stored and the broker never confirmed move to one live instance: not while
    the owner heartbeats, not twice, and the old owner no longer sees them as its own."""
    dead, live, other = (ResultStore(registry_db, g) for g in ("gw-dead", "gw-live", "gw-other"))
    ghost = ResultStore(registry_db, "gw-ghost")  # stores a result and never registers (an old version)
    ghost.commit([("dev-b", 1, 1, 1)], [b"ghost"], NOW)
    ghost.close()
    first, _, _ = dead.commit([("dev-a", 1, 1, 1)], [b"r1"], NOW)
    second, _, _ = dead.commit([("dev-a", 1, 2, 1)], [b"r2"], NOW)
    ghost_b, r1, r2 = (result_batch(g, [r]) for g, r in (("gw-ghost", b"ghost"), ("gw-dead", b"r1"),
                                                          ("gw-dead", b"r2")))
    with Registry.open(registry_db) as reg:
        tier.register(reg.db, "gw-dead", host="a", pid=1, version="t", now_ns=NOW)
        tier.register(reg.db, "gw-live", host="b", pid=2, version="t", now_ns=NOW)
        tier.register(reg.db, "gw-other", host="c", pid=3, version="t", now_ns=NOW)
    # Heartbeat 30 s old, takeover after 60 s: still its owner's (only the unregistered one moves).
    got = live.take_over(NOW + 30 * 10**9, 60.0)
    assert [owner for _, owner in got] == ["gw-ghost"]
    assert [p for _, p in dead.pending()] == [r1, r2]
    # 61 s (the survivors heartbeat on): both move, oldest first, to the first survivor that looks; the
    # next finds none.
    with Registry.open(registry_db) as reg:
        for gid in ("gw-live", "gw-other"):
            tier.heartbeat(reg.db, gid, NOW + 60 * 10**9)
    assert live.take_over(NOW + 61 * 10**9, 60.0) == [(first, "gw-dead"), (second, "gw-dead")]
    assert other.take_over(NOW + 62 * 10**9, 60.0) == []
    assert [p for _, p in live.pending()] == [ghost_b, r1, r2] and dead.pending() == []
    assert first is not None and dead.payload(first) is None and live.payload(first) == r1
    # The frozen owner wakes and gets a PUBACK for one: the row goes (by id), whoever holds it.
    dead.published(first)
    dead.purge()
    assert [p for _, p in live.pending()] == [ghost_b, r2]
    # A live instance's own rows are never taken, however long ago they were stored.
    with Registry.open(registry_db) as reg:
        tier.heartbeat(reg.db, "gw-live", NOW + 200 * 10**9)
    assert other.take_over(NOW + 201 * 10**9, 60.0) == []
    for s in (dead, live, other):
        s.close()


def test_removed_devices_get_no_replay_row(registry_db: Path | str) -> None:
    store = ResultStore(registry_db, "gw-1")
    with Registry.open(registry_db) as reg:
        reg.remove("dev-b", NOW)
    store.commit([("dev-b", 1, 0, 1), ("dev-a", 1, 0, 1)], [b"x", b"x"], NOW)
    with Registry.open(registry_db) as reg:
        assert set(reg.load_replay()) == {"dev-a"}
    store.close()


class _Counters:
    def __init__(self) -> None:
        self.accepted = 7
        self.rejections = {**dict.fromkeys(Reason, 0), Reason.REPLAY: 2, Reason.REVOKED: 1}
        self.windows = {"vibration": 7}
        self.queued = 3


def test_metrics_exposition_passes_promtool_and_uses_contract_names() -> None:
    stats = GatewayStats(connected=True, inflight=4, active_devices=2)
    stats.results[("classifier", "healthy")] = 5
    stats.e2e.observe_many([0.001, 0.02, 3.0])
    stats.processing.observe_many([0.0004, 0.002])
    stats.batch_hist("classifier").observe(5)
    stats.inference_hist("classifier", "cpu").observe(0.0003)
    stats.backends = [("classifier", "cpu", "auto")]
    stats.registry_devices = {"active": 4, "revoked": 1}
    text = generate_latest(make_registry(stats, _Counters)).decode()  # type: ignore[arg-type,return-value]
    check = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True,
                           timeout=30, check=False)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    for line in (
        'sgw_gateway_messages_total{outcome="accepted"} 7.0',
        'sgw_gateway_messages_total{outcome="rejected"} 3.0',
        'sgw_gateway_rejections_total{reason="overloaded"} 0.0',
        'sgw_gateway_windows_total{kind="vibration"} 7.0',
        'sgw_gateway_results_total{label="healthy",model="classifier"} 5.0',
        'sgw_gateway_e2e_latency_seconds_bucket{le="+Inf"} 3.0',
        'sgw_gateway_e2e_latency_seconds_bucket{le="0.025"} 2.0',
        'sgw_gateway_batch_size_count{model="classifier"} 1.0',
        'sgw_gateway_inference_latency_seconds_count{backend="cpu",model="classifier"} 1.0',
        "sgw_gateway_queue_depth 3.0", "sgw_gateway_inflight_messages 4.0", "sgw_gateway_active_devices 2.0",
        "sgw_gateway_connected 1.0", "sgw_gateway_reconnects_total 0.0",
        'sgw_gateway_model_backend_info{backend="cpu",model="classifier",requested="auto"} 1.0',
        'sgw_gateway_registry_devices{status="revoked"} 1.0',
    ):
        assert line in text, line
    assert "sgw_gateway_build_info{version=" in text


def test_contract_metric_names_and_labels_are_exported() -> None:
    from tests.sgw_metrics_contract import contract_metrics

    stats = GatewayStats()
    stats.batch_hist("classifier")
    stats.inference_hist("classifier", "cpu")
    stats.backends = [("classifier", "cpu", "auto")]
    stats.model_versions = [("classifier", "2.0.0")]
    stats.results[("classifier", "healthy")] = 1
    text = generate_latest(make_registry(stats, _Counters)).decode()  # type: ignore[arg-type,return-value]
    gateway = {n: s for n, s in contract_metrics().items() if n.startswith("sgw_gateway_")}
    assert len(gateway) >= 15
    for name, spec in gateway.items():
        series = f"{name}_count" if spec.type == "histogram" else name
        lines = [ln for ln in text.splitlines() if ln.startswith((series + "{", series + " "))]
        assert lines, name
        for label in spec.labels:
            assert all(f'{label}="' in ln for ln in lines), (name, label)


@pytest.mark.parametrize(
    ("old", "new", "needle"),
    [
        ("[batching]", "[batching]\nmax_batchh = 3", "batching.max_batchh: unknown key"),
        ("max_batch = 64", "max_batch = 0", "batching.max_batch: must be between"),
        ("poll_interval_s = 0.25", "poll_interval_s = 5.0", "registry.poll_interval_s"),
        ('accelerator = "auto"', 'accelerator = "tpu"', "inference.accelerator"),
        ('format = "text"', 'format = "xml"', "log.format"),
        ('path = "registry.db"', 'path = "missing.db"', "registry.path: file not found"),
        ('cert_file = "gateway/client.crt"', 'cert_file = "nope.crt"', "mqtt.cert_file: file not found"),
        ("workers = 1", "workers = 0", "gateway.workers: must be between 1 and 64"),
        ("takeover_after_s = 60", "takeover_after_s = 5", "gateway.takeover_after_s: must be between 15"),
        ("workers = 1", "workers = 65", "gateway.workers: must be between 1 and 64"),
        ("workers = 1", 'workers = "many"', 'gateway.workers: an integer 1-64 or "auto"'),
        ("workers = 1", "workers = 2.5", "gateway.workers: expected an integer, got float"),
        ('id = "gw-1"', 'id = "gw-1.w2"', "gateway.id: 1-48 characters"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, old: str, new: str, needle: str) -> None:
    prov = provision(tmp_path / "home", [])
    text = prov.gateway_toml.read_text()
    assert old in text
    bad = prov.home / "bad.toml"
    bad.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        load_config(bad)


def test_the_provisioned_config_loads_with_contract_defaults(tmp_path: Path) -> None:
    prov = provision(tmp_path / "home", [])
    conf = load_config(prov.gateway_toml)
    assert conf.mqtt.share_group == "sgw" and conf.mqtt.receive_maximum == 1024
    assert conf.batching.max_batch == 64 and conf.registry.poll_interval_s == 0.25
    assert conf.inference.routes.as_dict() == {"vibration": "classifier"}
    short = prov.home / "short.key"
    short.write_bytes(b"x" * 31)
    bad = prov.home / "bad.toml"
    bad.write_text(prov.gateway_toml.read_text().replace('"gateway/e2e.key"', '"short.key"'))
    with pytest.raises(ConfigError, match=r"e2e\.private_key_file: expected 32 raw bytes"):
        load_config(bad)


def test_workers_auto_and_each_workers_config(tmp_path: Path) -> None:
    prov = provision(tmp_path / "home", [])
    text = prov.gateway_toml.read_text()
    auto = prov.home / "auto.toml"
    auto.write_text(text.replace("workers = 1", 'workers = "auto"', 1))
    assert load_config(auto).gateway.worker_count() == len(os.sched_getaffinity(0))
    conf = load_config(prov.gateway_toml)
    assert for_worker(conf, 1) is conf
    with pytest.raises(ConfigError, match=r"worker 2.*file not found.*add-workers gw-1 --count 1"):
        for_worker(conf, 2)  # no identity issued yet
    rc, _out, err = run_cli(["gateway", "add-workers", "--count", "2", "--dir", str(prov.home)])
    assert rc == 0, err
    w2 = for_worker(conf, 2)
    assert w2.gateway.id == "gw-1"  # the instance; service.build derives the worker's identity
    assert w2.mqtt.cert_file.name == "client-w2.crt" and w2.mqtt.key_file.name == "client-w2.key"
    assert w2.metrics.port == conf.metrics.port + 1
    assert w2.mqtt.share_group == conf.mqtt.share_group and w2.registry == conf.registry


def _publish_packet(topic: bytes, mid: int | None, props: bytes, payload: bytes) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic
    if mid is not None:
        body += mid.to_bytes(2, "big")
    return body + bytes([len(props)]) + props + payload


@pytest.mark.parametrize(
    ("header", "mid", "props"),
    [
        (0x32, 517, b""),                 # QoS 1, no properties: the fast path
        (0x3B, 65535, b""),               # QoS 1, dup, retain
        (0x30, None, b""),                # QoS 0
        (0x32, 9, b"\x02\x00\x00\x00\x3c"),  # message expiry interval: paho's own decoder
    ],
)
def test_fast_publish_decoder_matches_paho(header: int, mid: int | None, props: bytes) -> None:
    from paho.mqtt.enums import MQTTProtocolVersion

    from gateway.server import paho_fast

    packet = _publish_packet(b"sgw/v1/dev/dev-1/up", mid, props, b"\x0a\x03abc" * 100)
    fast = paho_fast.decode_publish(header, packet, MQTTProtocolVersion.MQTTv5)
    slow = paho_fast._original(header, packet, MQTTProtocolVersion.MQTTv5)
    for field in ("dup", "qos", "retain", "topic", "mid", "payload"):
        assert getattr(fast, field) == getattr(slow, field), field
    assert str(fast.properties) == str(slow.properties)
    assert paho_fast.install() and paho_fast.install()  # idempotent


def test_store_and_tier_commands_on_sqlite(tmp_path: Path) -> None:
    prov = provision(tmp_path / "home", [])
    home = str(prov.home)
    for argv in (["store", "--help"], ["store", "migrate", "--help"], ["gateway", "status", "--help"]):
        rc, out, _ = run_cli(argv)
        assert rc == 0 and "usage:" in out
    rc, out, err = run_cli(["store", "migrate", "--dir", home, "--json"])
    assert rc == 0, err
    where = str(prov.home.resolve() / "registry.db")
    assert json.loads(out) == {"store": "sqlite", "where": where, "applied": []}
    rc, out, _ = run_cli(["store", "status", "--dir", home, "--json"])
    assert rc == 0 and json.loads(out)["store"] == "sqlite"
    # No gateway has opened this registry yet: an empty tier, not an error.
    rc, out, err = run_cli(["gateway", "status", "--dir", home, "--json"])
    assert rc == 0, err
    assert json.loads(out)["instances"] == []
    rc, out, err = run_cli(["store", "migrate", "--url", "mysql://x", "--dir", home])
    assert (rc, out) == (2, "") and err.count("\n") == 1 and "--url" in err


def test_the_registry_poll_forgets_removed_devices(tmp_path: Path) -> None:
    """A removed device's replay window and session leave the gateway's Opener at the next registry poll
    (the Opener's state stays bounded by the registry); other devices keep theirs."""
    import time

    from gateway.core import keys
    from gateway.core.session import Opened, Sealer
    from gateway.server.service import Service, build

    prov = provision(tmp_path / "home", ["dev-a", "dev-b"])
    gw = build(load_config(prov.gateway_toml), prov.gateway_toml)
    try:
        assert gw.opener is not None
        gateway_public = (prov.home / "gateway" / "e2e.pub").read_bytes()
        for dev in ("dev-a", "dev-b"):
            sealer = Sealer(device_id=dev, device_key=keys.private_from_bytes(
                (prov.home / "devices" / dev / "e2e.key").read_bytes()), device_key_id=1,
                gateway_public=gateway_public, gateway_key_id=1, epoch=1)
            assert isinstance(gw.opener.open(sealer.seal(b"x"), time.time_ns(), dev), Opened)
        assert {"dev-a", "dev-b"} <= set(gw.opener._windows)
        rc, _, err = run_cli(["device", "remove", "dev-a", "--dir", str(prov.home)])
        assert rc == 0, err
        Service(gw)._refresh_registry()
        assert "dev-a" not in gw.opener._windows and "dev-a" not in gw.opener._sessions
        assert "dev-b" in gw.opener._windows
    finally:
        gw.store.close()
        gw.registry.close()
