"""The sgw home directory (docs/ARCHITECTURE.md "Home directory") and the operations that change it.

Each operation stages its files in a private temporary directory next to their destination and renames
them into place only when everything else (key generation, the registry transaction) has succeeded, so a
refused or failed command leaves the home exactly as it was.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.core import suites
from gateway.core.codec import SENSOR_KINDS
from gateway.errors import ProvisioningError
from gateway.pki import templates
from gateway.pki.ca import (
    CertificateAuthority,
    Issued,
    cert_pem,
    check_sans,
    ec_key_pem,
    new_mlkem768,
    new_x25519,
    not_after_ns,
    serial_hex,
)
from gateway.pki.files import (
    PRIVATE,
    PRIVATE_DIR,
    PUBLIC,
    fsync_dir,
    publish_dir,
    staging_dir,
    write_atomic,
    write_new,
)
from gateway.registry.ids import ADMIN_CN, DEFAULT_GATEWAY_ID, OBSERVER_CN, gateway_cn, validate_device_id
from gateway.registry.store import NewDevice, Registry
from gateway.store.base import is_postgres_url

DEFAULT_SANS = ("localhost", "127.0.0.1")
DEFAULT_KIND = "vibration"
_CRL_TARGETS = "crl-targets"
GATEWAY_KEM_PUB = "gateway_e2e_mlkem.pub"  # in a device bundle
# The broker folder keeps its CRL in a subfolder the sgw home's owner can write (see pki/broker.py).
BROKER_CRL_DIR = "crl"


def default_home() -> Path:
    env = os.environ.get("SGW_HOME")
    return Path(env) if env else Path.home() / ".sgw"


@dataclass(frozen=True)
class Home:
    root: Path

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def ca_cert(self) -> Path:
        return self.ca_dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.ca_dir / "ca.key"

    @property
    def crl(self) -> Path:
        return self.ca_dir / "crl.pem"

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    @property
    def gateway_dir(self) -> Path:
        return self.root / "gateway"

    @property
    def gateway_e2e_pub(self) -> Path:
        return self.gateway_dir / "e2e.pub"

    @property
    def gateway_kem_key(self) -> Path:
        """The gateway's ML-KEM-768 private seed (suite x25519-mlkem768), 0600."""
        return self.gateway_dir / "e2e_mlkem.key"

    @property
    def gateway_kem_pub(self) -> Path:
        return self.gateway_dir / "e2e_mlkem.pub"

    @property
    def gateway_instances_dir(self) -> Path:
        """One folder per gateway instance after the first (`sgw gateway add-instance`)."""
        return self.gateway_dir / "instances"

    @property
    def observer_dir(self) -> Path:
        return self.root / "observer"

    @property
    def admin_dir(self) -> Path:
        """The broker-administration identity (kicks revoked devices off the broker)."""
        return self.root / "admin"

    @property
    def registry_path(self) -> Path:
        return self.root / "registry.db"

    @property
    def devices_dir(self) -> Path:
        return self.root / "devices"

    @property
    def release_pub(self) -> Path:
        """The trusted model-release key (`sgw model keygen --trust`); new bundles carry a copy."""
        return self.root / "release.pub"

    @property
    def release_pq_pub(self) -> Path:
        """The trusted ML-DSA-65 release key, when the fleet requires that second signature."""
        return self.root / "release-mldsa65.pub"

    @property
    def gateway_toml(self) -> Path:
        return self.root / "gateway.toml"

    def device_dir(self, device_id: str) -> Path:
        return self.devices_dir / device_id

    def require_ca(self) -> CertificateAuthority:
        return CertificateAuthority.load(self.ca_cert, self.ca_key)

    def gateway_configs(self) -> list[Path]:
        """gateway.toml first (what sgw ca/device/store read, the commit point of a change to all), then
        each instance's gateway-ID.toml (`sgw gateway add-instance`)."""
        others = sorted(p for p in self.root.glob("gateway-*.toml") if p.is_file())
        return [self.gateway_toml, *others]

    def store_location(self) -> Path | str:
        """The registry the `sgw ca`/`sgw device` commands write: the store HOME/gateway.toml names (its
        `[store] url` when that is PostgreSQL, the store the gateways read), else HOME/registry.db."""
        if not self.gateway_toml.exists():
            return self.registry_path
        return store_in(self.gateway_toml)

    def open_registry(self) -> Registry:
        if not self.ca_key.exists():
            raise ProvisioningError(f"no CA in {self.root}; run 'sgw ca init --dir {self.root}' first")
        return Registry.open(self.store_location())

    def broker_defaults(self) -> tuple[str, int, int]:
        """(host, port, gateway e2e key id) from gateway.toml, the defaults for new agent.toml files."""
        try:
            data = tomllib.loads(self.gateway_toml.read_text())
            return str(data["mqtt"]["host"]), int(data["mqtt"]["port"]), int(data["e2e"]["key_id"])
        except FileNotFoundError:
            raise ProvisioningError(f"missing {self.gateway_toml}; run 'sgw ca init' first") from None
        except (KeyError, ValueError, TypeError, tomllib.TOMLDecodeError) as exc:
            raise ProvisioningError(f"{self.gateway_toml}: cannot read mqtt/e2e settings ({exc})") from None


def store_in(config: Path) -> Path | str:
    """The store a gateway.toml names, read without loading the rest (a host that only migrates or
    provisions may lack the gateway's key files): `[store] url`, else `[registry] path` (relative to the
    file's folder, default registry.db)."""
    try:
        data = tomllib.loads(config.read_text())
    except OSError as exc:
        raise ProvisioningError(f"cannot read {config}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProvisioningError(f"{config}: not valid TOML: {exc}") from None
    url = data.get("store", {}).get("url", "")
    if not isinstance(url, str) or (url and not is_postgres_url(url)):
        raise ProvisioningError(f'{config}: store.url must be "" or a postgresql:// URL')
    if url:
        return url
    path = data.get("registry", {}).get("path", "registry.db")
    if not isinstance(path, str) or not path:
        raise ProvisioningError(f"{config}: registry.path must name a file")
    where = Path(path).expanduser()
    return where if where.is_absolute() else config.resolve().parent / where


# -- ca init ----------------------------------------------------------------------------------------


def init_home(
    root: Path, *, sans: Sequence[str] = DEFAULT_SANS, force: bool = False,
    broker_host: str = "127.0.0.1", broker_port: int = 8883,
) -> Home:
    """Create the CA, the broker's server certificate, the gateway's and observer's client certificates,
    the gateway's X25519 identity, an empty registry, an empty CRL and gateway.toml.

    With `force`, an existing home is replaced: every previously issued device becomes unusable (new
    CA, new gateway e2e key), so existing device bundles and the registry are removed as well.
    """
    home = Home(root)
    existing = [p for p in (home.ca_dir, home.broker_dir, home.gateway_dir, home.observer_dir,
                            home.admin_dir, home.registry_path, home.devices_dir) if p.exists()]
    if existing and not force:
        raise ProvisioningError(
            f"{root} already holds an sgw CA ({existing[0].name}); use --force to replace it "
            "(this invalidates every issued device)"
        )
    _check_port(broker_port)
    if not broker_host or any(c.isspace() or c in '"\\' for c in broker_host):
        raise ProvisioningError(f"invalid broker host {broker_host!r}")
    check_sans(sans)
    root.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    ca = CertificateAuthority.create()
    with staging_dir(root, "init") as stage:
        ca_dir = stage / "ca"
        ca_dir.mkdir()
        write_new(ca_dir / "ca.crt", cert_pem(ca.cert))
        write_new(ca_dir / "ca.key", ec_key_pem(ca.key), mode=PRIVATE)
        write_new(ca_dir / "crl.pem", ca.crl([]))
        server = ca.issue("sgw-broker", client=False, server=True, sans=sans)
        write_pair(stage / "broker", "server", cert_pem(server.cert), ec_key_pem(server.key))
        gateway = ca.issue(gateway_cn(DEFAULT_GATEWAY_ID))
        write_pair(stage / "gateway", "client", cert_pem(gateway.cert), ec_key_pem(gateway.key))
        e2e_private, e2e_public = new_x25519()
        write_new(stage / "gateway" / "e2e.key", e2e_private, mode=PRIVATE)
        write_new(stage / "gateway" / "e2e.pub", e2e_public)
        kem_private, kem_public = new_mlkem768()
        write_new(stage / "gateway" / "e2e_mlkem.key", kem_private, mode=PRIVATE)
        write_new(stage / "gateway" / "e2e_mlkem.pub", kem_public)
        observer = ca.issue(OBSERVER_CN)
        write_pair(stage / "observer", "client", cert_pem(observer.cert), ec_key_pem(observer.key))
        admin = ca.issue(ADMIN_CN)
        write_pair(stage / "admin", "client", cert_pem(admin.cert), ec_key_pem(admin.key))
        new_registry = stage / "registry.db"
        Registry.open(new_registry, create=True).close()
        write_new(stage / "gateway.toml",
                  templates.gateway_toml(host=broker_host, port=broker_port).encode())
        os.sync()
        # Point of no return: swap the staged tree in. Old parts go to a trash folder first so that a
        # failure between renames can be repaired by hand from it.
        with staging_dir(root, "trash") as trash:
            for name in ("ca", "broker", "gateway", "observer", "admin", "registry.db", "registry.db-wal",
                         "registry.db-shm", "devices", "gateway.toml"):
                if (root / name).exists():
                    (root / name).rename(trash / name)
            for name in ("ca", "broker", "gateway", "observer", "admin", "registry.db", "gateway.toml"):
                (stage / name).rename(root / name)
            home.devices_dir.mkdir(mode=PRIVATE_DIR)
            fsync_dir(root)
    return home


def write_pair(folder: Path, stem: str, cert: bytes, key: bytes) -> None:
    folder.mkdir(exist_ok=True)
    write_new(folder / f"{stem}.crt", cert)
    write_new(folder / f"{stem}.key", key, mode=PRIVATE)


def _check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise ProvisioningError(f"invalid port {port}: must be 1-65535")


# -- devices ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceSpec:
    device_id: str
    kind: str = DEFAULT_KIND
    host: str | None = None
    port: int | None = None
    suite: int = suites.X25519  # the suite its agent seals with, and its minimum in the registry


Progress = Callable[[int, int], None]


def add_devices(home: Home, specs: Sequence[DeviceSpec], *, progress: Progress | None = None) -> int:
    """Issue and register devices, all or nothing. Returns the number added.

    Everything is checked before anything is written: id syntax, duplicates in the request, in the
    registry and on disk. Bundles are built in one staging folder and renamed into `devices/` inside the
    registry's write transaction, so a failure at any point leaves neither rows nor bundles behind.
    """
    if not specs:
        raise ProvisioningError("no devices to add")
    seen: set[str] = set()
    for spec in specs:
        validate_device_id(spec.device_id)
        if spec.device_id in seen:
            raise ProvisioningError(f"device {spec.device_id} is listed twice")
        seen.add(spec.device_id)
        _check_kind(spec.kind)
        if spec.port is not None:
            _check_port(spec.port)
        if spec.host is not None and (not spec.host or any(c.isspace() for c in spec.host)):
            raise ProvisioningError(f"device {spec.device_id}: invalid broker host {spec.host!r}")
        if spec.suite not in suites.UPLINK:
            raise ProvisioningError(f"device {spec.device_id}: unknown suite {spec.suite}")
    ca = home.require_ca()
    host, port, gw_key_id = home.broker_defaults()
    gateway_public = home.gateway_e2e_pub.read_bytes()
    release_public = home.release_pub.read_bytes() if home.release_pub.is_file() else None
    release_pq = home.release_pq_pub.read_bytes() if home.release_pq_pub.is_file() else None
    kem_public = home.gateway_kem_pub.read_bytes() if home.gateway_kem_pub.exists() else None
    if kem_public is None and any(spec.suite == suites.HYBRID for spec in specs):
        raise ProvisioningError(f"{home.root} has no gateway ML-KEM-768 key for suite x25519-mlkem768; "
                                "run 'sgw ca migrate' first")
    ca_pem = home.ca_cert.read_bytes()
    with home.open_registry() as registry:
        for spec in specs:
            _check_absent(home, registry, spec.device_id)
        total = len(specs)
        rows: list[NewDevice] = []
        with staging_dir(home.devices_dir, "add") as stage:
            for i, spec in enumerate(specs, 1):
                rows.append(_build_bundle(
                    stage / spec.device_id, ca, ca_pem, gateway_public, spec,
                    host=spec.host or host, port=spec.port or port, gw_key_id=gw_key_id,
                    release_public=release_public, release_pq=release_pq, kem_public=kem_public,
                ))
                if progress:
                    progress(i, total)
            # One sync for the whole batch instead of a few fsyncs per file: at thousands of devices
            # per-file fsync dominated the run time.
            os.sync()
            moved: list[Path] = []
            try:
                with registry.transaction():
                    # The write lock is held from here: re-check, since another `sgw device add` may have
                    # committed the same id while we were generating keys.
                    for spec in specs:
                        _check_absent(home, registry, spec.device_id)
                    registry.add_devices(rows)
                    for spec in specs:
                        publish_dir(stage / spec.device_id, home.device_dir(spec.device_id), mode=PRIVATE_DIR,
                                    fsync=False)
                        moved.append(home.device_dir(spec.device_id))
                    fsync_dir(home.devices_dir)
            except BaseException:
                for path in moved:
                    shutil.rmtree(path, ignore_errors=True)
                raise
    return len(rows)


def _check_kind(kind: str) -> None:
    if kind not in SENSOR_KINDS:  # the agent refuses any other kind at start-up
        raise ProvisioningError(f"invalid device kind {kind!r}: one of {', '.join(SENSOR_KINDS)}")


def _check_absent(home: Home, registry: Registry, device_id: str) -> None:
    if registry.get(device_id) is not None:
        raise ProvisioningError(f"device {device_id} already exists")
    if home.device_dir(device_id).exists():
        raise ProvisioningError(
            f"device {device_id} is not registered but {home.device_dir(device_id)} exists; remove it first"
        )


def _build_bundle(
    folder: Path, ca: CertificateAuthority, ca_pem: bytes, gateway_public: bytes, spec: DeviceSpec,
    *, host: str, port: int, gw_key_id: int, key_id: int = 1, release_public: bytes | None = None,
    release_pq: bytes | None = None, kem_public: bytes | None = None,
) -> NewDevice:
    folder.mkdir(mode=PRIVATE_DIR)
    issued = ca.issue(spec.device_id)
    e2e_private, e2e_public = new_x25519()
    write_new(folder / "ca.crt", ca_pem)
    write_new(folder / "device.crt", cert_pem(issued.cert))
    write_new(folder / "device.key", ec_key_pem(issued.key), mode=PRIVATE)
    write_new(folder / "e2e.key", e2e_private, mode=PRIVATE)
    write_new(folder / "e2e.pub", e2e_public)
    write_new(folder / "gateway_e2e.pub", gateway_public)
    if release_public is not None:
        write_new(folder / "release.pub", release_public)
    if release_pq is not None:
        write_new(folder / "release-mldsa65.pub", release_pq)
    if kem_public is not None:  # public: every bundle gets it, so a device can move up to suite 3 later
        write_new(folder / GATEWAY_KEM_PUB, kem_public)
    write_new(folder / "agent.toml", templates.agent_toml(
        device_id=spec.device_id, kind=spec.kind, host=host, port=port,
        device_key_id=key_id, gateway_key_id=gw_key_id, seed=_seed(spec.device_id),
        release_key=release_public is not None, release_pq_key=release_pq is not None,
        suite=suites.NAMES[spec.suite], gateway_kem_file=GATEWAY_KEM_PUB if kem_public is not None else "",
    ).encode())
    return NewDevice(spec.device_id, spec.kind, e2e_public, issued.serial, not_after_ns(issued.cert),
                     min_suite=spec.suite)


def _seed(device_id: str) -> int:
    # A stable per-device seed so simulated fleets are not all identical, and reruns are reproducible.
    return int.from_bytes(device_id.encode()[:8].ljust(8, b"\0"), "big") % 1_000_003 + 1


@dataclass(frozen=True)
class SuiteChange:
    previous: int  # the registry's minimum before
    minimum: int  # after (unchanged with bundle_only)
    bundle: Path | None  # the agent.toml rewritten, None when the home holds no bundle for the device


def set_device_suite(home: Home, device_id: str, suite: int, *, bundle_only: bool = False,
                     lower: bool = False, registry_only: bool = False) -> SuiteChange:
    """Move a device to `suite`: its bundle's agent.toml seals with it and (unless `bundle_only`) the
    registry holds it to it. All or nothing, under the registry's write lock.

    Raise the floor only once the agent runs the new agent.toml and its outbox holds nothing sealed in
    the old suite: the gateway refuses those as `downgrade` and never receipts them. Lowering a floor is
    what a downgrade is, so it needs `lower`.
    """
    validate_device_id(device_id)
    if suite not in suites.UPLINK:
        raise ProvisioningError(f"unknown suite {suite}")
    if suite == suites.HYBRID and not home.gateway_kem_pub.exists():
        raise ProvisioningError(f"{home.root} has no gateway ML-KEM-768 key for suite x25519-mlkem768; "
                                "run 'sgw ca migrate' first")
    folder = home.device_dir(device_id)
    config = folder / "agent.toml"
    with home.open_registry() as registry, registry.transaction():
        record = registry.get(device_id)
        if record is None:
            raise ProvisioningError(f"unknown device {device_id}")
        if record.status != "active":
            raise ProvisioningError(f"device {device_id} is {record.status}")
        if not bundle_only and suites.below(suite, record.min_suite) and not lower:
            raise ProvisioningError(
                f"device {device_id} is held to {suites.NAMES.get(record.min_suite, record.min_suite)}; "
                "a lower minimum lets it be downgraded: pass --lower to mean it")
        rewritten = None
        if config.exists() and not registry_only:  # registry_only: the device was told over the downlink
            kem = GATEWAY_KEM_PUB if home.gateway_kem_pub.exists() else ""
            text = templates.with_suite(config.read_text(), suites.NAMES[suite], kem)
            if text is None:
                raise ProvisioningError(f"{config}: no single [e2e] suite / gateway_key_id line to edit")
            if kem and not (folder / GATEWAY_KEM_PUB).exists():
                write_atomic(folder / GATEWAY_KEM_PUB, home.gateway_kem_pub.read_bytes(), mode=PUBLIC)
            write_atomic(config, text.encode(), mode=PUBLIC)
            rewritten = config
        previous = record.min_suite
        if not bundle_only:
            registry.set_min_suite(device_id, suite)
    return SuiteChange(previous, previous if bundle_only else suite, rewritten)


def revoke_device(home: Home, device_id: str, *, now_ns: int | None = None) -> list[str]:
    """Mark the device revoked and re-issue the CRL; returns warnings about broker CRL copies."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    ca = home.require_ca()
    with home.open_registry() as registry:
        registry.revoke(device_id, now_ns)
        return _crl_after_commit(home, ca, registry, now_ns, f"device {device_id} is revoked")


def remove_device(home: Home, device_id: str, *, now_ns: int | None = None) -> list[str]:
    """Delete the device's row and bundle; its certificate goes on the CRL. Returns CRL warnings."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    ca = home.require_ca()
    with home.open_registry() as registry:
        folder = home.device_dir(device_id)
        with staging_dir(home.devices_dir, "remove") as trash:
            moved = False
            try:
                with registry.transaction():
                    registry.remove(device_id, now_ns)
                    if folder.exists():
                        folder.rename(trash / device_id)
                        moved = True
            except BaseException:
                # The row is still there, so its bundle must be too.
                if moved:
                    (trash / device_id).rename(folder)
                raise
            return _crl_after_commit(home, ca, registry, now_ns, f"device {device_id} is removed")


@dataclass(frozen=True)
class Rotated:
    key_id: int
    cert_serial: str
    old_valid_until_ns: int
    warnings: tuple[str, ...] = ()


def rotate_device(home: Home, device_id: str, *, grace_s: int = 86400, now_ns: int | None = None) -> Rotated:
    """New TLS key and certificate, new e2e key under the next key_id; the bundle is rewritten in place.

    Files are replaced one by one rather than by swapping the folder, because an agent may be running
    from the bundle with its outbox beside it. All new files are first written under temporary names
    (the step that can fail: disk full, permissions); then, holding the registry's write lock, the key
    is registered and the files renamed over the old ones, so a failure before that point changes
    nothing. agent.toml keeps the operator's edits: only `device_key_id` changes.
    """
    now_ns = time.time_ns() if now_ns is None else now_ns
    validate_device_id(device_id)
    ca = home.require_ca()
    folder = home.device_dir(device_id)
    with home.open_registry() as registry:
        with registry.transaction():
            key_id, issued = _rotate_in_tx(home, registry, ca=ca, folder=folder, device_id=device_id,
                                           grace_s=grace_s, now_ns=now_ns)
        # The old certificate joins the CRL when the grace period is over and the CRL is next issued.
        warnings = _crl_after_commit(home, ca, registry, now_ns, f"device {device_id} is rotated")
    return Rotated(key_id, issued.serial, now_ns + grace_s * 1_000_000_000, tuple(warnings))


def _rotate_in_tx(home: Home, registry: Registry, *, ca: CertificateAuthority, folder: Path, device_id: str,
                  grace_s: int, now_ns: int) -> tuple[int, Issued]:
    record = registry.get(device_id)
    if record is None:
        raise ProvisioningError(f"unknown device {device_id}")
    if record.status != "active":
        raise ProvisioningError(f"device {device_id} is {record.status}; add it again under a new id")
    if not folder.is_dir():
        raise ProvisioningError(f"bundle {folder} is missing")
    # Under the write lock, so no concurrent rotation can take the same id.
    key_id = max((k.key_id for k in record.keys), default=0) + 1
    issued = ca.issue(device_id)
    e2e_private, e2e_public = new_x25519()
    contents = {
        "device.key": (ec_key_pem(issued.key), PRIVATE),
        "device.crt": (cert_pem(issued.cert), PUBLIC),
        "e2e.key": (e2e_private, PRIVATE),
        "e2e.pub": (e2e_public, PUBLIC),
        "ca.crt": (home.ca_cert.read_bytes(), PUBLIC),
        "gateway_e2e.pub": (home.gateway_e2e_pub.read_bytes(), PUBLIC),
        **({GATEWAY_KEM_PUB: (home.gateway_kem_pub.read_bytes(), PUBLIC)} if home.gateway_kem_pub.exists()
           else {}),
        "agent.toml": (_rotated_agent_toml(folder / "agent.toml", home, device_id, record.kind, key_id,
                                           min_suite=record.min_suite), PUBLIC),
    }
    staged: dict[str, Path] = {}
    try:
        for name, (data, mode) in contents.items():
            staged[name] = folder / f".{name}.{secrets.token_hex(6)}.tmp"
            write_new(staged[name], data, mode=mode)
        os.sync()
        got = registry.rotate_key(
            device_id, e2e_public, grace_s, now_ns,
            new_cert_serial=issued.serial, new_cert_not_after_ns=not_after_ns(issued.cert),
        )
        if got != key_id:
            raise ProvisioningError(f"device {device_id}: key id changed under us ({got} != {key_id})")
        # agent.toml last: it names the key id the other files now hold.
        for name in contents:
            staged.pop(name).replace(folder / name)
        fsync_dir(folder)
    finally:
        for leftover in staged.values():
            leftover.unlink(missing_ok=True)
    return key_id, issued


def _rotated_agent_toml(path: Path, home: Home, device_id: str, kind: str, key_id: int, *,
                        min_suite: int = suites.X25519) -> bytes:
    """The bundle's agent.toml with the new key id; re-rendered only if it is missing or unreadable."""
    try:
        text = path.read_text()
        tomllib.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        text = ""
    edited = templates.with_device_key_id(text, key_id) if text else None
    host, port, gw_key_id = home.broker_defaults()
    if edited is not None:
        # The bundle gets the home's current gateway_e2e.pub: its key id must follow a gateway key rotation.
        return (templates.with_gateway_key_id(edited, gw_key_id) or edited).encode()
    kem = GATEWAY_KEM_PUB if home.gateway_kem_pub.exists() else ""
    return templates.agent_toml(device_id=device_id, kind=kind, host=host, port=port, device_key_id=key_id,
                                gateway_key_id=gw_key_id, seed=_seed(device_id),
                                suite=suites.NAMES.get(min_suite, "x25519"), gateway_kem_file=kem).encode()


def rotate_device_remote(home: Home, device_id: str, *, e2e_public: bytes, csr_der: bytes, key_id: int,
                         grace_s: int = 86400, now_ns: int | None = None) -> tuple[Rotated, bytes]:
    """The CA's half of a rotation the device started: returns (what rotated, the certificate as DER).

    The device made both new keys and sent only their public halves (its e2e key and a certificate
    request) in a reply sealed with its current key, so the request is as authentic as the device's
    uplink. `key_id` is the id the device proposed (its current one + 1): if the registry already holds
    a newer key (a bundle from `sgw device rotate` that was never installed) the ids would disagree, so
    this refuses rather than register a key under an id the device does not expect. The home's bundle
    keeps only the public parts afterwards: its private keys are the superseded ones.
    """
    from gateway.pki.csr import requested_key  # noqa: PLC0415  (only this path parses requests)

    now_ns = time.time_ns() if now_ns is None else now_ns
    validate_device_id(device_id)
    if len(e2e_public) != 32:
        raise ProvisioningError("the device's new e2e key must be 32 bytes")
    tls_public = requested_key(csr_der, device_id)
    ca = home.require_ca()
    folder = home.device_dir(device_id)
    with home.open_registry() as registry:
        with registry.transaction():
            record = registry.get(device_id)
            if record is None or record.status != "active":
                raise ProvisioningError(f"device {device_id} is not an active device")
            newest = max(record.keys, key=lambda k: k.key_id, default=None)
            if newest is not None and newest.key_id == key_id and newest.public == e2e_public:
                # A retry: the first answer was lost on the way back. Same keys, same certificate.
                cert = x509.load_pem_x509_certificate((folder / "device.crt").read_bytes())
                if cert.public_key() != tls_public:
                    raise ProvisioningError(f"device {device_id} asks again for key id {key_id} with "
                                            "another TLS key; run 'sgw device rotate' instead")
                return (Rotated(key_id, serial_hex(cert), 0),
                        cert.public_bytes(serialization.Encoding.DER))
            expected = (newest.key_id if newest is not None else 0) + 1
            if key_id != expected:
                raise ProvisioningError(
                    f"device {device_id} proposes key id {key_id} but the registry's next is {expected}: "
                    "install the bundle from the last 'sgw device rotate' on the device first")
            cert = ca.leaf(device_id, tls_public)
            got = registry.rotate_key(device_id, e2e_public, grace_s, now_ns,
                                      new_cert_serial=serial_hex(cert),
                                      new_cert_not_after_ns=not_after_ns(cert))
            if got != key_id:
                raise ProvisioningError(f"device {device_id}: key id changed under us ({got} != {key_id})")
        if folder.is_dir():
            write_atomic(folder / "device.crt", cert_pem(cert), mode=PUBLIC)
            write_atomic(folder / "e2e.pub", e2e_public, mode=PUBLIC)
            write_atomic(folder / "agent.toml", _rotated_agent_toml(folder / "agent.toml", home, device_id,
                                                                    record.kind, key_id), mode=PUBLIC)
            for stale in ("device.key", "e2e.key"):
                (folder / stale).unlink(missing_ok=True)
        warnings = _crl_after_commit(home, ca, registry, now_ns, f"device {device_id} is rotated")
    rotated = Rotated(key_id, serial_hex(cert), now_ns + grace_s * 1_000_000_000, tuple(warnings))
    return rotated, cert.public_bytes(serialization.Encoding.DER)


# -- CRL ----------------------------------------------------------------------------------------


def write_crl(home: Home, ca: CertificateAuthority | None = None, registry: Registry | None = None,
              now_ns: int | None = None) -> list[str]:
    """Re-issue the CRL into HOME/ca/crl.pem and every broker folder made by `sgw broker config`.

    Returns one warning per broker copy that could not be updated (e.g. a folder this user may not
    write): the registry change has already happened, so the command reports instead of failing.
    """
    now_ns = time.time_ns() if now_ns is None else now_ns
    ca = ca or home.require_ca()
    if registry is None:
        with home.open_registry() as reg:
            revoked = reg.revoked_certs(now_ns)
    else:
        revoked = registry.revoked_certs(now_ns)
    pem = ca.crl(revoked)
    write_atomic(home.crl, pem, mode=PUBLIC)
    warnings = []
    for target in crl_targets(home):
        folder = target / BROKER_CRL_DIR
        if not folder.is_dir():
            continue  # that broker folder was deleted; nothing reads this copy any more
        try:
            write_atomic(folder / "crl.pem", pem, mode=PUBLIC)
        except OSError as exc:
            warnings.append(
                f"could not update {folder / 'crl.pem'} ({exc.strerror or exc}); copy {home.crl} there "
                "and reload mosquitto"
            )
    return warnings


def _crl_after_commit(home: Home, ca: CertificateAuthority, registry: Registry, now_ns: int,
                      done: str) -> list[str]:
    """Re-issue the CRL after a committed registry change; a failure must not read as "nothing done"."""
    try:
        return write_crl(home, ca, registry, now_ns)
    except OSError as exc:
        raise ProvisioningError(
            f"{done} in the registry, but {exc.filename or 'the CRL'} could not be written "
            f"({exc.strerror or exc}); fix that and run 'sgw ca crl'"
        ) from None


def crl_targets(home: Home) -> list[Path]:
    path = home.broker_dir / _CRL_TARGETS
    if not path.exists():
        return []
    return [Path(line) for line in path.read_text().splitlines() if line.strip()]


def add_crl_target(home: Home, folder: Path) -> None:
    targets = crl_targets(home)
    folder = folder.resolve()
    if folder not in targets:
        targets.append(folder)
        write_atomic(home.broker_dir / _CRL_TARGETS, "".join(f"{t}\n" for t in targets).encode())
