"""Gateway instances and sgw's service identities in a home: `sgw gateway add-instance`, `sgw ca migrate`.

The broker makes each certificate CN the MQTT client id (use_username_as_clientid), so two processes with
one certificate displace each other. Every gateway instance therefore has its own CN,
`sgw-gateway-<gateway.id>`: the first one (from `sgw ca init`) lives in HOME/gateway/, each further one in
HOME/gateway/instances/<id>/ with its own HOME/gateway-<id>.toml. The set of instances is read from these
folders (one source of truth), and the broker ACL lists one block per instance.

An instance that runs several worker processes (`[gateway] workers`) needs one identity per worker for
the same reason: `sgw gateway add-workers` issues worker k's pair (CN sgw-gateway-<id>.w<k>) beside the
instance's own, client-w<k>.crt / client-w<k>.key (ids.worker_file), and each gets an ACL block too.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway.errors import ProvisioningError
from gateway.pki import templates
from gateway.pki.ca import cert_pem, ec_key_pem, new_mlkem768
from gateway.pki.files import PRIVATE, PRIVATE_DIR, staging_dir, write_atomic, write_new
from gateway.pki.home import Home, write_pair
from gateway.registry.ids import (
    ADMIN_CN,
    DEFAULT_GATEWAY_ID,
    MAX_WORKERS,
    gateway_cn,
    is_gateway_id,
    validate_gateway_id,
    worker_file,
    worker_id,
)


def cert_cn(path: Path) -> str:
    """The subject CN of a PEM certificate file ("" when it has none)."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def default_instance_id(home: Home) -> str:
    """The gateway.id in HOME/gateway.toml: the instance whose identity is HOME/gateway/client.crt."""
    try:
        data = tomllib.loads(home.gateway_toml.read_text())
    except FileNotFoundError:
        raise ProvisioningError(f"missing {home.gateway_toml}; run 'sgw ca init' first") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProvisioningError(f"{home.gateway_toml}: {exc}") from None
    gid = data.get("gateway", {}).get("id", DEFAULT_GATEWAY_ID)
    if not isinstance(gid, str) or not is_gateway_id(gid):
        raise ProvisioningError(f"{home.gateway_toml}: gateway.id {gid!r} is not a valid instance id")
    return gid


def gateway_instances(home: Home) -> list[str]:
    """Every gateway instance id of the home, the default one first."""
    ids = [default_instance_id(home)]
    if home.gateway_instances_dir.is_dir():
        ids += sorted(p.name for p in home.gateway_instances_dir.iterdir()
                      if p.is_dir() and is_gateway_id(p.name) and (p / "client.crt").exists())
    return ids


def identity_dir(home: Home, gateway_id: str) -> Path:
    """The folder holding the instance's client.crt / client.key (and its workers' pairs)."""
    if gateway_id == default_instance_id(home):
        return home.gateway_dir
    return home.gateway_instances_dir / gateway_id


def instance_workers(home: Home, gateway_id: str) -> list[int]:
    """The workers k >= 2 of an instance that have an identity (a certificate file)."""
    cert = identity_dir(home, gateway_id) / "client.crt"
    return [k for k in range(2, MAX_WORKERS + 1) if worker_file(cert, k).exists()]


def gateway_identities(home: Home) -> list[str]:
    """Every gateway MQTT identity of the home (instances and their workers): one ACL block each."""
    return [worker_id(gid, k) for gid in gateway_instances(home)
            for k in [1, *instance_workers(home, gid)]]


@dataclass(frozen=True)
class Worker:
    worker: int
    gateway_id: str  # the worker's identity, ids.worker_id
    cert: Path
    key: Path
    issued: bool  # False: it existed already


def add_workers(home: Home, gateway_id: str, count: int) -> list[Worker]:
    """Issue the identities of workers 2..count of an instance (those that exist are kept)."""
    ca = home.require_ca()
    if gateway_id not in gateway_instances(home):
        raise ProvisioningError(
            f"no gateway instance {gateway_id!r} in {home.root} (see 'sgw gateway instances')")
    if not 1 <= count <= MAX_WORKERS:
        raise ProvisioningError(f"invalid worker count {count}: must be 1-{MAX_WORKERS}")
    folder = identity_dir(home, gateway_id)
    cert0, key0 = folder / "client.crt", folder / "client.key"
    out = []
    for k in range(2, count + 1):
        cert, key = worker_file(cert0, k), worker_file(key0, k)
        wid = worker_id(gateway_id, k)
        if cert.exists():
            if cert_cn(cert) != gateway_cn(wid):
                raise ProvisioningError(
                    f"{cert} is for {cert_cn(cert)!r}, not {gateway_cn(wid)!r}; remove it")
            out.append(Worker(k, wid, cert, key, issued=False))
            continue
        if key.exists():
            raise ProvisioningError(f"{key} exists without its certificate; remove it first")
        issued = ca.issue(gateway_cn(wid))
        with staging_dir(home.root, "add-workers") as stage:
            write_pair(stage, cert.stem, cert_pem(issued.cert), ec_key_pem(issued.key))
            # Key first: a worker counts as existing once its certificate is in place.
            (stage / key.name).rename(key)
            (stage / cert.name).rename(cert)
        out.append(Worker(k, wid, cert, key, issued=True))
    return out


def instance_toml(home: Home, gateway_id: str) -> Path:
    if gateway_id == default_instance_id(home):
        return home.gateway_toml
    return home.root / f"gateway-{gateway_id}.toml"


@dataclass(frozen=True)
class Instance:
    gateway_id: str
    cn: str
    config: Path
    cert: Path


def add_instance(home: Home, gateway_id: str) -> Instance:
    """Issue a gateway instance identity and write its gateway-<id>.toml (same e2e key and registry)."""
    validate_gateway_id(gateway_id)
    ca = home.require_ca()
    if gateway_id in gateway_instances(home):
        raise ProvisioningError(f"gateway instance {gateway_id} already exists")
    folder = home.gateway_instances_dir / gateway_id
    config = instance_toml(home, gateway_id)
    for path in (folder, config):
        if path.exists():
            raise ProvisioningError(f"{path} exists but is not a complete instance; remove it first")
    host, port, key_id = home.broker_defaults()
    home.gateway_instances_dir.mkdir(mode=PRIVATE_DIR, exist_ok=True)
    issued = ca.issue(gateway_cn(gateway_id))
    with staging_dir(home.root, "add-instance") as stage:
        write_pair(stage / gateway_id, "client", cert_pem(issued.cert), ec_key_pem(issued.key))
        write_new(stage / "gateway.toml", templates.gateway_toml(
            host=host, port=port, gateway_id=gateway_id, key_id=key_id,
            identity_dir=f"gateway/instances/{gateway_id}", written_by="sgw gateway add-instance",
            store_url=store if isinstance(store := home.store_location(), str) else "",
        ).encode())
        # The toml goes first: an instance counts as existing once its certificate folder is in place.
        (stage / "gateway.toml").rename(config)
        (stage / gateway_id).rename(folder)
    return Instance(gateway_id, gateway_cn(gateway_id), config, folder / "client.crt")


def migration_steps(home: Home) -> list[str]:
    """What `sgw ca migrate` would change in this home (empty: up to date)."""
    steps = []
    gid = default_instance_id(home)
    cert = home.gateway_dir / "client.crt"
    if cert.exists() and cert_cn(cert) != gateway_cn(gid):
        steps.append(f"re-issue {cert} for CN {gateway_cn(gid)} (was {cert_cn(cert)!r})")
    if not (home.admin_dir / "client.crt").exists():
        steps.append(f"issue the broker-administration identity {ADMIN_CN} in {home.admin_dir}")
    if not home.gateway_kem_key.exists():
        steps.append(f"make the gateway's ML-KEM-768 key {home.gateway_kem_key} (suite x25519-mlkem768)")
    steps.extend(f"name it in {config} ([e2e] mlkem_private_key_file)"
                 for config in _configs_without_kem_key(home))
    return steps


def _configs_without_kem_key(home: Home) -> list[Path]:
    out = []
    for gid in gateway_instances(home):
        config = instance_toml(home, gid)
        if config.exists() and templates.with_mlkem_key(config.read_text()) != config.read_text():
            out.append(config)
    return out


def migrate(home: Home) -> list[str]:
    """Bring a home made by an older sgw up to date; returns what was done (idempotent)."""
    ca = home.require_ca()
    done = migration_steps(home)
    gid = default_instance_id(home)
    cert = home.gateway_dir / "client.crt"
    if cert.exists() and cert_cn(cert) != gateway_cn(gid):
        issued = ca.issue(gateway_cn(gid))
        with staging_dir(home.gateway_dir, "migrate") as stage:
            write_pair(stage / "new", "client", cert_pem(issued.cert), ec_key_pem(issued.key))
            # Key first, then certificate: a crash in between leaves a pair the startup check refuses
            # with a clear message (CN mismatch is impossible; the key simply does not match).
            (stage / "new" / "client.key").replace(home.gateway_dir / "client.key")
            (stage / "new" / "client.crt").replace(cert)
    if not (home.admin_dir / "client.crt").exists():
        admin = ca.issue(ADMIN_CN)
        with staging_dir(home.root, "migrate") as stage:
            write_pair(stage / "admin", "client", cert_pem(admin.cert), ec_key_pem(admin.key))
            (stage / "admin").rename(home.admin_dir)
    if not home.gateway_kem_key.exists():
        kem_private, kem_public = new_mlkem768()
        with staging_dir(home.gateway_dir, "migrate") as stage:
            write_new(stage / "e2e_mlkem.key", kem_private, mode=PRIVATE)
            write_new(stage / "e2e_mlkem.pub", kem_public)
            # Public half first: the private file's presence is what marks this step done.
            (stage / "e2e_mlkem.pub").replace(home.gateway_kem_pub)
            (stage / "e2e_mlkem.key").replace(home.gateway_kem_key)
    for config in _configs_without_kem_key(home):
        edited = templates.with_mlkem_key(config.read_text())
        if edited is None:
            raise ProvisioningError(f"{config}: no single [e2e] private_key_file line to add "
                                    "mlkem_private_key_file after; add it by hand")
        write_atomic(config, edited.encode(), mode=config.stat().st_mode & 0o777)
    return done
