"""agent.toml as frozen dataclasses (schema: docs/ARCHITECTURE.md), checked in full before anything starts.

Every problem is one ConfigError naming the key: unknown keys, wrong types and unreadable files come from
gateway.common.config; ranges, the replay file and the end-to-end key files are checked here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gateway.common.config import file_field, load_toml, require_range
from gateway.common.sections import LogSection, MetricsSection
from gateway.core import envelope, keys, suites
from gateway.core.codec import SensorKindName
from gateway.errors import ConfigError
from gateway.registry.ids import is_device_id

FaultName = Literal["healthy", "imbalance", "misalignment", "looseness", "bearing", "shift"]

MIN_OUTBOX_BYTES = 65536  # one maximal message must always fit
REPLAY_SUFFIXES = (".csv", ".npy")
IIO_CHANNELS = ("accel_x", "accel_y", "accel_z")
_IIO_ACCEL = re.compile(r"accel_[a-z0-9_]{1,32}")


@dataclass(frozen=True, kw_only=True)
class DeviceSection:
    id: str
    kind: SensorKindName = "vibration"

    def __post_init__(self) -> None:
        if not is_device_id(self.id):
            raise ConfigError(
                f"device.id: {self.id!r} is not a device id (1-64 of [A-Za-z0-9._-], not starting with sgw-)"
            )


@dataclass(frozen=True, kw_only=True)
class MqttSection:
    host: str
    port: int = 8883
    ca_file: Path = file_field()
    cert_file: Path = file_field()
    key_file: Path = file_field()
    keepalive_s: int = 30

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("mqtt.host: must not be empty")
        require_range("mqtt.port", self.port, 1, 65535)
        require_range("mqtt.keepalive_s", self.keepalive_s, 5, 65535)


@dataclass(frozen=True, kw_only=True)
class E2eSection:
    device_key_file: Path = file_field()
    device_key_id: int = 1
    gateway_public_key_file: Path = file_field()
    gateway_key_id: int = 1
    # The uplink suite this agent seals with (docs/PROTOCOL.md): "x25519" or "x25519-mlkem768", which also
    # needs the gateway's ML-KEM-768 public key (`gateway_mlkem_public_key_file`, in the bundle).
    suite: str = "x25519"
    gateway_mlkem_public_key_file: Path = file_field(Path())

    def __post_init__(self) -> None:
        require_range("e2e.device_key_id", self.device_key_id, 0, envelope.MAX_U32)
        require_range("e2e.gateway_key_id", self.gateway_key_id, 0, envelope.MAX_U32)
        hybrid = suites.number(self.suite, "e2e.suite") == suites.HYBRID
        if hybrid and self.gateway_mlkem_public_key_file == Path():
            raise ConfigError("e2e.gateway_mlkem_public_key_file: required for suite x25519-mlkem768")

    @property
    def suite_number(self) -> int:
        return suites.number(self.suite, "e2e.suite")


@dataclass(frozen=True, kw_only=True)
class FaultSpec:
    at_s: float
    duration_s: float
    fault: FaultName

    def __post_init__(self) -> None:
        require_range("source.faults.at_s", self.at_s, 0, 1e9)
        require_range("source.faults.duration_s", self.duration_s, 0, 1e9)


@dataclass(frozen=True, kw_only=True)
class SourceSection:
    type: Literal["simulated", "replay", "iio", "pipe"] = "simulated"
    seed: int = 1
    sample_rate_hz: float = 1600.0
    window: int = 128
    faults: list[FaultSpec] = field(default_factory=list)
    path: Path = Path()
    # Real-time factor for both sources: 1.0 = real time, 10 = ten times faster, 0 = as fast as possible.
    speed: float = 1.0
    # iio (gateway/agent/iio.py): the device's `name` ("adxl355") or number ("0", "iio:device0").
    device: str = ""
    channels: list[str] = field(default_factory=lambda: list(IIO_CHANNELS))
    sysfs_root: Path = Path("/sys/bus/iio/devices")
    dev_root: Path = Path("/dev")
    buffer_length: int = 0  # kernel buffer in scans; 0 = 8 windows
    trigger: str = ""  # "" = the driver's own (or none); else written to trigger/current_trigger
    # pipe (gateway/agent/pipe.py): path is a FIFO or file, "" = stdin; formats in pipe_format.py.
    format: Literal["frames", "csv"] = "frames"
    # Resample to this rate on the device before the prefilter (gateway/agent/resample.py): for a sensor
    # that cannot sample at the model's rate. 0 = off (the windows go at sample_rate_hz).
    resample_hz: float = 0.0

    def __post_init__(self) -> None:
        require_range("source.sample_rate_hz", self.sample_rate_hz, 1.0, 1e6)
        if self.resample_hz:
            require_range("source.resample_hz", self.resample_hz, 1.0, 1e6)
        require_range("source.window", self.window, 16, 16384)
        require_range("source.speed", self.speed, 0.0, 1e6)
        if self.type == "replay":
            if self.path == Path():
                raise ConfigError("source.path: required when source.type = 'replay'")
            if self.path.suffix.lower() not in REPLAY_SUFFIXES:
                raise ConfigError(f"source.path: expected a .csv or .npy recording, got {self.path.name}")
            if not self.path.is_file():
                raise ConfigError(f"source.path: file not found: {self.path}")
        if self.type == "iio":
            self._check_iio()
        if self.type == "pipe" and self.path != Path() and not self.path.exists():
            raise ConfigError(f"source.path: no FIFO or file at {self.path} (mkfifo it first)")

    def _check_iio(self) -> None:
        if not self.device:
            raise ConfigError("source.device: required when source.type = 'iio' (a name or number)")
        if len(self.channels) != 3 or len(set(self.channels)) != 3:
            raise ConfigError(f"source.channels: expected 3 distinct channels, got {self.channels}")
        for ch in self.channels:
            if not _IIO_ACCEL.fullmatch(ch):
                raise ConfigError(f"source.channels: {ch!r} is not an accel channel (accel_x ...)")
        if self.buffer_length:
            require_range("source.buffer_length", self.buffer_length, self.window, 1 << 20)


@dataclass(frozen=True, kw_only=True)
class FilterSection:
    summary_interval_s: float = 10.0
    manifest: Path = Path()  # Path() = the packaged manifest

    def __post_init__(self) -> None:
        require_range("filter.summary_interval_s", self.summary_interval_s, 0.01, 86400 * 7)
        if self.manifest != Path() and not self.manifest.is_file():
            raise ConfigError(f"filter.manifest: file not found: {self.manifest}")


@dataclass(frozen=True, kw_only=True)
class ModelSection:
    """Signed model releases (gateway/agent/models.py). Without a trusted key every release is refused."""

    release_public_key_file: Path = file_field(Path())
    # Set: releases must also carry a valid ML-DSA-65 signature by this key (docs/SECURITY.md)
    release_pq_public_key_file: Path = file_field(Path())
    store: Path = Path()  # Path() = beside the outbox: <outbox.path>.models
    # A switch is on probation until the new release has scored this many windows and passed its
    # self-test (gateway/agent/probation.py); a crash or a failed self-test meanwhile goes back.
    probation_windows: int = 64
    # The self-test: the new release scores the last selftest_windows windows the old one kept as
    # healthy and may forward at most this share of them (docs/OPERATIONS.md, "Releasing a model").
    selftest_windows: int = 64
    selftest_max_forward: float = 0.25
    max_unconfirmed_starts: int = 3  # starts on an unconfirmed release before it counts as a crash loop

    def __post_init__(self) -> None:
        require_range("model.probation_windows", self.probation_windows, 1, 1_000_000)
        require_range("model.selftest_windows", self.selftest_windows, 1, 4096)
        require_range("model.selftest_max_forward", self.selftest_max_forward, 0.0, 1.0)
        require_range("model.max_unconfirmed_starts", self.max_unconfirmed_starts, 1, 100)


@dataclass(frozen=True, kw_only=True)
class OutboxSection:
    path: Path = Path("outbox.db")
    max_bytes: int = 64 * 1024 * 1024
    max_age_s: int = 7 * 86400
    policy: Literal["drop_oldest", "refuse_newest"] = "drop_oldest"
    # "receipt": a window leaves the outbox only when the gateway's sealed receipt says it committed it
    # (the broker's PUBACK only means in flight). "puback": the old rule, for gateways without receipts.
    delete_on: Literal["receipt", "puback"] = "receipt"
    receipt_timeout_s: float = 30.0  # unreceipted this long after its PUBACK: sent again

    def __post_init__(self) -> None:
        if self.path == Path():
            raise ConfigError("outbox.path: must name a file")
        require_range("outbox.max_bytes", self.max_bytes, MIN_OUTBOX_BYTES, 1 << 40)
        require_range("outbox.max_age_s", self.max_age_s, 1, 10 * 365 * 86400)
        require_range("outbox.receipt_timeout_s", self.receipt_timeout_s, 0.5, 3600.0)


MIN_COMMISSION_WINDOWS = 60  # fewer cannot set a 1 % threshold from the baseline's own distances


@dataclass(frozen=True, kw_only=True)
class CommissionSection:
    """Per-device baseline (gateway/agent/baseline.py). Off by default until the demo and pipeline
    tests run a commissioning phase; when on, the agent forwards no anomaly until it has learned."""

    enabled: bool = False
    windows: int = 300
    target_false_forward: float = 0.01
    path: Path = Path()  # Path() = beside the outbox: <outbox.path>.baseline

    def __post_init__(self) -> None:
        require_range("commission.windows", self.windows, MIN_COMMISSION_WINDOWS, 1_000_000)
        require_range("commission.target_false_forward", self.target_false_forward, 0.001, 0.2)


@dataclass(frozen=True, kw_only=True)
class EnrollSection:
    """Zero-touch enrollment (gateway/agent/enroll.py): used while agent.toml has no [device] yet;
    kept afterwards as a record of where the identity came from."""

    # Read only while enrolling (gateway/agent/enroll.py names an unreadable one then), so a factory
    # key that is locked away after enrollment does not stop the agent.
    idevid_cert_file: Path  # PEM: the IDevID first, then any intermediates
    idevid_key_file: Path  # the factory key; it signs, it never leaves the device
    ca_file: Path  # sgw's CA certificate (public): authenticates the broker and the answer
    host: str
    port: int = 8884  # the broker's enrollment listener (`sgw broker config --enroll-port`)
    timeout_s: float = 30.0  # no answer this long: ask again (fresh nonce, same keys)
    retry_s: float = 60.0  # after a refusal: ask again this much later (the operator may allow it)

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("enroll.host: must not be empty")
        require_range("enroll.port", self.port, 1, 65535)
        require_range("enroll.timeout_s", self.timeout_s, 1.0, 3600.0)
        require_range("enroll.retry_s", self.retry_s, 0.1, 86400.0)


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    device: DeviceSection
    mqtt: MqttSection
    e2e: E2eSection
    source: SourceSection = field(default_factory=SourceSection)
    filter: FilterSection = field(default_factory=FilterSection)
    outbox: OutboxSection = field(default_factory=OutboxSection)
    commission: CommissionSection = field(default_factory=CommissionSection)
    model: ModelSection = field(default_factory=ModelSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    log: LogSection = field(default_factory=LogSection)
    enroll: EnrollSection | None = None

    @property
    def baseline_path(self) -> Path:
        if self.commission.path != Path():
            return self.commission.path
        return self.outbox.path.with_name(self.outbox.path.name + ".baseline")

    @property
    def model_store(self) -> Path:
        if self.model.store != Path():
            return self.model.store
        return self.outbox.path.with_name(self.outbox.path.name + ".models")

    @property
    def topic(self) -> str:
        return f"sgw/v1/dev/{self.device.id}/up"


@dataclass(frozen=True, kw_only=True)
class E2eKeys:
    device_key: X25519PrivateKey = field(repr=False)
    gateway_public: bytes = field(repr=False)
    gateway_kem_public: bytes | None = field(default=None, repr=False)  # suite x25519-mlkem768 only


def load_agent_config(path: Path) -> AgentConfig:
    return load_toml(path, AgentConfig)


def load_e2e_keys(cfg: E2eSection) -> E2eKeys:
    """Reads both key files; a wrong size is a ConfigError naming the key (never showing its bytes)."""
    device_raw = _read_key(cfg.device_key_file, "e2e.device_key_file")
    gateway_raw = _read_key(cfg.gateway_public_key_file, "e2e.gateway_public_key_file")
    kem_raw = None
    if cfg.suite_number == suites.HYBRID:
        path = cfg.gateway_mlkem_public_key_file
        try:
            kem_raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"e2e.gateway_mlkem_public_key_file: cannot read {path}: "
                              f"{exc.strerror or exc}") from None
        try:
            keys.kem_public_from_bytes(kem_raw)
        except ConfigError as exc:
            raise ConfigError(f"e2e.gateway_mlkem_public_key_file: {exc}") from None
    try:
        keys.public_from_bytes(gateway_raw)
        return E2eKeys(device_key=keys.private_from_bytes(device_raw), gateway_public=gateway_raw,
                       gateway_kem_public=kem_raw)
    except ValueError as exc:
        raise ConfigError(f"e2e: unusable key: {exc}") from None


def _read_key(path: Path, key: str) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) != keys.KEY_BYTES:
        raise ConfigError(
            f"{key}: expected a raw {keys.KEY_BYTES}-byte X25519 key, {path} has {len(raw)} bytes"
        )
    return raw
