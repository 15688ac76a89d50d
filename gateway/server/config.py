"""gateway.toml, exactly the schema in docs/ARCHITECTURE.md, loaded strictly before anything starts.

Every problem is one ConfigError naming the key (`pipeline.device_rate: must be between ...`), so the
CLI exits 2 with a line an operator can act on instead of a traceback from deep inside the service.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from gateway.common.config import check_readable, file_field, load_toml, require_range
from gateway.common.sections import LogSection
from gateway.common.sections import MetricsSection as _Metrics
from gateway.core import suites as _suites
from gateway.core.codec import SENSOR_KINDS
from gateway.core.envelope import id_pattern
from gateway.errors import ConfigError
from gateway.registry.ids import (
    MAX_GATEWAY_ID_LEN,
    MAX_WORKERS,
    is_gateway_id,
    is_sparkplug_id,
    worker_file,
)
from gateway.server.tier import SILENT_AFTER_S
from gateway.store.base import is_postgres_url

_SHARE_GROUP = id_pattern(64)
# A heartbeat older than this is a silent instance, never a running one (gateway/server/tier.py).
TAKEOVER_MIN_S = SILENT_AFTER_S


@dataclass(frozen=True)
class GatewaySection:
    id: str = "gw-1"
    # Worker processes under one service (gateway/server/workers.py): an integer, or "auto" for one per
    # CPU this process may run on. Worker k >= 2 needs its identity from `sgw gateway add-workers`.
    workers: int | str = 1
    # Results another instance stored but the broker never confirmed are published by a survivor once
    # that instance has not heartbeated for this long (killed and not restarted, hung, or stopped with
    # results left): longer than a systemd restart, after which it republishes them itself.
    takeover_after_s: float = 60.0

    def __post_init__(self) -> None:
        # The id becomes the MQTT client id (persistent session) and a key in the pending-results table.
        if not is_gateway_id(self.id):
            raise ConfigError(f"gateway.id: 1-{MAX_GATEWAY_ID_LEN} characters of [A-Za-z0-9._-], "
                              "not ending in .w<digits>")
        if isinstance(self.workers, str):
            if self.workers != "auto":
                raise ConfigError(
                    f'gateway.workers: an integer 1-{MAX_WORKERS} or "auto", got {self.workers!r}')
        else:
            require_range("gateway.workers", self.workers, 1, MAX_WORKERS)
        require_range("gateway.takeover_after_s", self.takeover_after_s, TAKEOVER_MIN_S, 86_400)

    def worker_count(self) -> int:
        """`workers` resolved: "auto" is the CPUs this process may use (CPUAffinity= respected)."""
        if isinstance(self.workers, int):
            return self.workers
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
        return max(1, min(cpus, MAX_WORKERS))


@dataclass(frozen=True)
class MqttSection:
    ca_file: Path = file_field()
    cert_file: Path = file_field()
    key_file: Path = file_field()
    host: str = "127.0.0.1"
    port: int = 8883
    share_group: str = "sgw"
    session_expiry_s: int = 3600
    receive_maximum: int = 1024
    keepalive_s: int = 30

    def __post_init__(self) -> None:
        require_range("mqtt.port", self.port, 1, 65535)
        if not _SHARE_GROUP.fullmatch(self.share_group):
            raise ConfigError("mqtt.share_group: 1-64 characters of [A-Za-z0-9._-] (no wildcards or '/')")
        require_range("mqtt.session_expiry_s", self.session_expiry_s, 0, 0xFFFFFFFF)
        require_range("mqtt.receive_maximum", self.receive_maximum, 1, 65535)
        require_range("mqtt.keepalive_s", self.keepalive_s, 5, 3600)


@dataclass(frozen=True)
class PreviousKey:
    """A gateway key being rotated out (`sgw gateway rotate-key`): still opened until `accept_until_ms`,
    refused as gateway_key_retired after (docs/PROTOCOL.md, "Gateway key rotation")."""

    key_id: int
    private_key_file: Path = file_field()
    mlkem_private_key_file: Path = file_field(Path())
    accept_until_ms: int = 0

    def __post_init__(self) -> None:
        require_range("e2e.previous.key_id", self.key_id, 0, 0xFFFFFFFF)
        require_range("e2e.previous.accept_until_ms", self.accept_until_ms, 0, 1 << 62)


@dataclass(frozen=True)
class E2eSection:
    private_key_file: Path = file_field()
    key_id: int = 1
    # The ML-KEM-768 half of the gateway key (64-byte seed) for suite x25519-mlkem768; "" = none.
    mlkem_private_key_file: Path = file_field(Path())
    # The fleet's allow-list of uplink suites; [] = every suite this gateway has keys for.
    suites: list[str] = field(default_factory=list)
    previous: list[PreviousKey] = field(default_factory=list)

    def __post_init__(self) -> None:
        require_range("e2e.key_id", self.key_id, 0, 0xFFFFFFFF)
        ids = [p.key_id for p in self.previous]
        if self.key_id in ids or len(set(ids)) != len(ids):
            raise ConfigError("e2e.previous: each key id once, and never the current e2e.key_id")
        for name in self.suites:
            _suites.number(name, "e2e.suites")
        if "x25519-mlkem768" in self.suites and self.mlkem_private_key_file == Path():
            raise ConfigError("e2e.suites: x25519-mlkem768 needs e2e.mlkem_private_key_file "
                              "(run 'sgw ca migrate' to make one)")

    def allowed_suites(self) -> frozenset[int]:
        if self.suites:
            return _suites.numbers(self.suites, "e2e.suites")
        hybrid = {_suites.HYBRID} if self.mlkem_private_key_file != Path() else set()
        return frozenset({_suites.X25519} | hybrid)


@dataclass(frozen=True)
class RegistrySection:
    # Required and readable unless store.url names PostgreSQL (checked in load_config, which knows both).
    path: Path = field(default_factory=Path)
    poll_interval_s: float = 0.25

    def __post_init__(self) -> None:
        # The revocation bound is 1 s: polling slower than that could not meet it.
        require_range("registry.poll_interval_s", self.poll_interval_s, 0.01, 1.0)


@dataclass(frozen=True)
class StoreSection:
    """Where the shared state lives (gateway/store): "" = the SQLite file at registry.path; a PostgreSQL
    URL puts the registry, replay windows, pending results and downlink epochs there, shared by every
    instance of the tier (docs/OPERATIONS.md, "When to move to PostgreSQL"). Keep the password out of the
    URL: libpq reads ~/.pgpass, PGPASSFILE or PGPASSWORD."""

    url: str = ""

    def __post_init__(self) -> None:
        if self.url and not is_postgres_url(self.url):
            raise ConfigError('store.url: expected "" (SQLite at registry.path) or postgresql://user@host:port/db')


@dataclass(frozen=True)
class PipelineSection:
    max_message_bytes: int = 65536
    max_clock_skew_s: float = 30.0
    device_rate: float = 200.0
    device_burst: int = 400
    queue_max: int = 8192

    def __post_init__(self) -> None:
        require_range("pipeline.max_message_bytes", self.max_message_bytes, 256, 16 * 1024 * 1024)
        require_range("pipeline.max_clock_skew_s", self.max_clock_skew_s, 0.0, 86400.0)
        require_range("pipeline.device_rate", self.device_rate, 0.001, 1e6)
        require_range("pipeline.device_burst", self.device_burst, 1, 1_000_000)
        require_range("pipeline.queue_max", self.queue_max, 1, 1_000_000)


@dataclass(frozen=True)
class RoutesSection:
    """Sensor kind -> manifest model name ("" = not routed: such windows are rejected `unroutable`)."""

    vibration: str = "classifier"
    temperature: str = ""
    current: str = ""

    def as_dict(self) -> dict[str, str]:
        return {k: v for k in SENSOR_KINDS if (v := getattr(self, k))}


@dataclass(frozen=True)
class InferenceSection:
    accelerator: str = "auto"
    delegates: list[str] = field(default_factory=list)
    manifest: Path = field(default_factory=Path)
    num_threads: int = 1
    routes: RoutesSection = field(default_factory=RoutesSection)
    # Signed model releases (gateway/server/releases.py): the trusted key, and releases to run instead
    # of the manifest's model of the same name. Path() = no trusted key: every release is refused.
    release_public_key_file: Path = file_field(Path())
    release_pq_public_key_file: Path = file_field(Path())  # set: an ML-DSA-65 signature is required too
    releases: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        acc = self.accelerator
        if acc not in ("auto", "npu", "gpu", "cpu") and not (acc.startswith("delegate:") and len(acc) > 9):
            raise ConfigError(
                f"inference.accelerator: expected auto, npu, gpu, cpu or delegate:/path/lib.so, got {acc!r}"
            )
        require_range("inference.num_threads", self.num_threads, 1, 64)
        if self.manifest != Path() and not self.manifest.is_file():
            raise ConfigError(f"inference.manifest: file not found: {self.manifest}")
        if not self.routes.as_dict():
            raise ConfigError("inference.routes: at least one sensor kind must route to a model")
        for i, path in enumerate(self.releases):
            check_readable(path, f"inference.releases[{i}]")


@dataclass(frozen=True)
class BatchingSection:
    max_batch: int = 64
    max_wait_ms: float = 5.0

    def __post_init__(self) -> None:
        require_range("batching.max_batch", self.max_batch, 1, 4096)
        require_range("batching.max_wait_ms", self.max_wait_ms, 0.0, 10_000.0)


@dataclass(frozen=True)
class ResultsSection:
    json: bool = False
    deadletter: bool = False
    # End-to-end receipts to devices on their cmd topic (docs/PROTOCOL.md, "Receipts"). Agents delete a
    # window only on a receipt; turn off only for a fleet of agents that delete on PUBACK.
    receipts: bool = True


@dataclass(frozen=True)
class SparkplugSection:
    """The optional Sparkplug B edge node (gateway/server/sparkplug.py, docs/OPERATIONS.md "SCADA").

    Its own MQTT identity (CN sgw-sparkplug-<gateway.id>, `sgw gateway add-sparkplug`): the broker allows
    one connection per CN, and the edge node's Will (NDEATH) must not be tied to the telemetry session.
    The certificate files are checked only when enabled, so the template can name them before they exist.
    """

    enabled: bool = False
    group_id: str = "sgw"
    edge_node_id: str = ""  # "" = gateway.id
    silence_s: float = 60.0  # DDEATH after a device sent nothing for this long
    cert_file: Path = field(default_factory=Path)
    key_file: Path = field(default_factory=Path)

    def __post_init__(self) -> None:
        # Topic levels: Sparkplug forbids '+', '#' and '/' in them; sgw's id alphabet keeps logs plain too.
        if not is_sparkplug_id(self.group_id):
            raise ConfigError("sparkplug.group_id: 1-64 characters of [A-Za-z0-9._-]")
        if self.edge_node_id and not is_sparkplug_id(self.edge_node_id):
            raise ConfigError('sparkplug.edge_node_id: 1-64 characters of [A-Za-z0-9._-] ("" = gateway.id)')
        require_range("sparkplug.silence_s", self.silence_s, 1.0, 86400.0)


@dataclass(frozen=True, kw_only=True)
class MetricsSection(_Metrics):
    port: int = 9108


@dataclass(frozen=True)
class GatewayConfig:
    mqtt: MqttSection
    e2e: E2eSection
    registry: RegistrySection
    gateway: GatewaySection = field(default_factory=GatewaySection)
    store: StoreSection = field(default_factory=StoreSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    inference: InferenceSection = field(default_factory=InferenceSection)
    batching: BatchingSection = field(default_factory=BatchingSection)
    results: ResultsSection = field(default_factory=ResultsSection)
    sparkplug: SparkplugSection = field(default_factory=SparkplugSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    log: LogSection = field(default_factory=LogSection)


def load_config(path: Path) -> GatewayConfig:
    conf = load_toml(path, GatewayConfig)
    if not conf.store.url:
        if conf.registry.path == Path():
            raise ConfigError("registry.path: required key is missing (or set store.url to a PostgreSQL URL)")
        check_readable(conf.registry.path, "registry.path")
    raw = conf.e2e.private_key_file.read_bytes()
    if len(raw) != 32:
        raise ConfigError(f"e2e.private_key_file: expected 32 raw bytes (X25519), got {len(raw)}")
    if conf.e2e.mlkem_private_key_file != Path():
        size = len(conf.e2e.mlkem_private_key_file.read_bytes())
        if size != _suites.KEM_SEED_BYTES:
            raise ConfigError(f"e2e.mlkem_private_key_file: expected a {_suites.KEM_SEED_BYTES}-byte "
                              f"ML-KEM-768 seed, got {size} bytes")
    spb = conf.sparkplug
    if spb.enabled and conf.gateway.worker_count() > 1:
        # Each worker sees only its share of the devices; one edge node per worker is not built yet.
        raise ConfigError(
            "gateway.workers: [sparkplug] enabled needs workers = 1 (run more instances instead)")
    if spb.enabled:
        for key, file in (("sparkplug.cert_file", spb.cert_file), ("sparkplug.key_file", spb.key_file)):
            if file == Path():
                raise ConfigError(f"{key}: required when sparkplug.enabled (see 'sgw gateway add-sparkplug')")
            check_readable(file, key)
    return conf


def for_worker(conf: GatewayConfig, worker: int) -> GatewayConfig:
    """The config worker `worker` (1-based) runs: its own certificate and key (ids.worker_file; its
    identity is ids.worker_id of gateway.id, which `service.build` derives) and its own metrics port
    (metrics.port + worker - 1; docs/OPERATIONS.md says why one port per worker). Worker 1 is the
    instance unchanged."""
    if worker == 1:
        return conf
    m = conf.mqtt
    cert, key = worker_file(m.cert_file, worker), worker_file(m.key_file, worker)
    for name, path in (("cert_file", cert), ("key_file", key)):
        try:
            check_readable(path, f"mqtt.{name} (worker {worker})")
        except ConfigError as exc:
            raise ConfigError(f"{exc}; run 'sgw gateway add-workers {conf.gateway.id} --count "
                              f"{conf.gateway.worker_count()}'") from None
    port = conf.metrics.port + worker - 1 if conf.metrics.port else 0
    if port > 65535:
        raise ConfigError(f"metrics.port: worker {worker} would listen on {port} (metrics.port + worker - 1)")
    return dataclasses.replace(
        conf,
        mqtt=dataclasses.replace(m, cert_file=cert, key_file=key),
        metrics=dataclasses.replace(conf.metrics, port=port),
    )


def store_location(conf: GatewayConfig) -> Path | str:
    """What Registry.open and ResultStore take: the PostgreSQL URL when set, else the SQLite file."""
    return conf.store.url or conf.registry.path


def state_dir(conf: GatewayConfig, config_path: Path) -> Path:
    """This instance's own small files (Sparkplug bdSeq): beside the SQLite registry, or beside the config
    file when the registry is in PostgreSQL."""
    return (conf.registry.path if conf.registry.path != Path() else config_path).parent


def model_store_path(conf: GatewayConfig, config_path: Path) -> Path:
    """Where released models are installed (gateway/server/releases.py): `<registry>.models` in the
    state folder, `registry.db.models` when the registry is in PostgreSQL."""
    return state_dir(conf, config_path) / f"{conf.registry.path.name or 'registry.db'}.models"


def edge_node_id(conf: GatewayConfig) -> str:
    return conf.sparkplug.edge_node_id or conf.gateway.id
