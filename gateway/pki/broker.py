"""mosquitto configuration that enforces sgw's identities: mutual TLS, CN as username, a CRL, and an
ACL where a device can only publish its own telemetry and read its own command topic.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.core.sparkplug import NAMESPACE
from gateway.errors import ProvisioningError
from gateway.pki.broker_control import DYNSEC_FILE, DYNSEC_TOPIC, PID_FILE, RUN_DIR, dynsec_config
from gateway.pki.ca import cert_pem
from gateway.pki.files import PRIVATE, PUBLIC, staging_dir, write_atomic, write_new
from gateway.pki.home import BROKER_CRL_DIR, Home, add_crl_target, crl_targets, write_crl
from gateway.pki.instances import gateway_identities
from gateway.pki.sparkplug import SparkplugNode, sparkplug_nodes
from gateway.registry.enrollment import EnrollmentStore
from gateway.registry.ids import ADMIN_CN, ENROLL_CN, OBSERVER_CN, SCADA_CN, gateway_cn, sparkplug_cn

# The enrollment listener's trust anchors: the allow-listed manufacturer CAs (`sgw enroll allow`).
MANUFACTURERS_FILE = "manufacturers.crt"

# Where distributions put mosquitto's dynamic-security plugin (Debian/Ubuntu: multiarch lib folder).
DYNSEC_PLUGIN_GLOBS = (
    "/usr/lib/*/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/lib64/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
)


def find_dynsec_plugin() -> Path | None:
    for pattern in DYNSEC_PLUGIN_GLOBS:
        for hit in sorted(Path("/").glob(pattern.lstrip("/"))):
            return hit
    return None

def _sparkplug_acl(nodes: Sequence[SparkplugNode]) -> str:
    """Each edge node writes only its own node and device topics and reads only its own commands."""
    blocks = "".join(f"""user {sparkplug_cn(n.gateway_id)}
topic write {NAMESPACE}/{n.group_id}/NBIRTH/{n.edge_node_id}
topic write {NAMESPACE}/{n.group_id}/NDEATH/{n.edge_node_id}
topic write {NAMESPACE}/{n.group_id}/DBIRTH/{n.edge_node_id}/+
topic write {NAMESPACE}/{n.group_id}/DDATA/{n.edge_node_id}/+
topic write {NAMESPACE}/{n.group_id}/DDEATH/{n.edge_node_id}/+
topic read {NAMESPACE}/{n.group_id}/NCMD/{n.edge_node_id}

""" for n in nodes)
    return f"""# Sparkplug B edge nodes (`sgw gateway add-sparkplug`): one identity per gateway instance.
{blocks}# The SCADA / host application: reads every Sparkplug topic, commands edge nodes, announces its STATE.
user {SCADA_CN}
topic read {NAMESPACE}/#
topic write {NAMESPACE}/+/NCMD/+
topic write {NAMESPACE}/STATE/+

"""


def acl_text(gateway_ids: Sequence[str], sparkplug: Sequence[SparkplugNode] = ()) -> str:
    """The broker ACL: deny by default; one block per gateway identity (instances and their workers,
    each with its own CN)."""
    gateways = "".join(f"""user {gateway_cn(gid)}
topic read sgw/v1/dev/+/up
topic write sgw/v1/results
topic write sgw/v1/results/#
topic write sgw/v1/deadletter
topic write sgw/v1/dev/+/cmd

""" for gid in gateway_ids)
    return f"""# Written by `sgw broker config`, rewritten by `sgw gateway add-instance` and `add-sparkplug`.
# Deny by default: anything not granted here is refused. Usernames are certificate CNs
# (use_identity_as_username), so these rules bind to issued identities.

# Each gateway instance reads all telemetry (directly or as $share/<group>/sgw/v1/dev/+/up) and publishes
# results.
{gateways}{_sparkplug_acl(sparkplug)}# Observers (dashboards) read results, dead letters and Sparkplug B only.
user {OBSERVER_CN}
topic read sgw/v1/results
topic read sgw/v1/results/#
topic read sgw/v1/deadletter
topic read {NAMESPACE}/#

# Broker administration: `sgw device revoke` disconnects a revoked device through the dynamic-security
# plugin (its control topic; the plugin's own file grants the same to this identity alone), and
# `sgw device cmd` publishes sealed commands and reads the sealed replies on the devices' up topics.
user {ADMIN_CN}
topic readwrite {DYNSEC_TOPIC}/#
topic write sgw/v1/dev/+/cmd
topic read sgw/v1/dev/+/up

# The enrollment service (`sgw enroll serve`): reads every enrollment request and answers it.
user {ENROLL_CN}
topic read sgw/v1/enroll/+/req
topic write sgw/v1/enroll/+/resp

# An IDevID on the enrollment listener: its username is its certificate subject as RFC 2253 text
# (use_subject_as_username), so it holds '=' and can never be an sgw identity; it may only ask on its
# own request topic and read its own answer. A device on the main listener could use these two topics
# for its own id too, and the service refuses that (the topic must name the request's IDevID).
pattern write sgw/v1/enroll/%u/req
pattern read sgw/v1/enroll/%u/resp

# Every device: write its own telemetry, read its own commands. %u is the certificate CN = device id,
# which provisioning guarantees contains no wildcard or '/'.
pattern write sgw/v1/dev/%u/up
pattern read sgw/v1/dev/%u/cmd
"""


@dataclass(frozen=True)
class BrokerConfig:
    out: Path
    conf: Path
    acl: Path
    warnings: tuple[str, ...] = ()


def write_broker_config(
    home: Home, out: Path, *, port: int = 8883, listen: str = "127.0.0.1", user: str = "mosquitto",
    force: bool = False, enroll_port: int | None = None,
) -> BrokerConfig:
    """Write mosquitto.conf, acl, ca.crt, server.crt/.key and crl/crl.pem into `out`.

    Copies rather than references the home's files, so the broker never needs access to the sgw home
    (where the CA key lives). Run as root with `user` set, the folder is handed to the broker's user:
    server.key 0640 root:<its group>, data/ owned by it; crl/ belongs to the home's owner so that
    `sgw device revoke`, run as that user, can replace the CRL there (the folders it recorded in
    HOME/broker/crl-targets).
    """
    if not 1 <= port <= 65535:
        raise ProvisioningError(f"invalid port {port}: must be 1-65535")
    if not listen or any(c.isspace() for c in listen):
        raise ProvisioningError(f"invalid listen address {listen!r}")
    if not user or any(c.isspace() for c in user):
        raise ProvisioningError(f"invalid user {user!r}")
    home.require_ca()
    manufacturers = b""
    if enroll_port is not None:
        if not 1 <= enroll_port <= 65535 or enroll_port == port:
            raise ProvisioningError(f"invalid enrollment port {enroll_port}: 1-65535, not the main port")
        manufacturers = manufacturers_pem(home)
        if not manufacturers:
            raise ProvisioningError("no manufacturer CA is allow-listed; run 'sgw enroll allow "
                                    "--manufacturer-ca FILE' before configuring the enrollment listener")
    server_crt, server_key = home.broker_dir / "server.crt", home.broker_dir / "server.key"
    for path in (server_crt, server_key, home.ca_cert):
        if not path.exists():
            raise ProvisioningError(f"missing {path}; run 'sgw ca init' first")
    owner = _owner(user)
    out = out.absolute()
    if out.exists() and any(out.iterdir()) and not force:
        raise ProvisioningError(f"{out} is not empty; use --force to overwrite the broker config there")
    out.parent.mkdir(parents=True, exist_ok=True)
    warnings_pre: list[str] = []
    with staging_dir(out.parent, out.name) as stage:
        shutil.copyfile(home.ca_cert, stage / "ca.crt")
        shutil.copyfile(server_crt, stage / "server.crt")
        write_new(stage / "server.key", server_key.read_bytes(), mode=PRIVATE)
        (stage / BROKER_CRL_DIR).mkdir()
        shutil.copyfile(home.crl, stage / BROKER_CRL_DIR / "crl.pem")
        for name in ("ca.crt", "server.crt", f"{BROKER_CRL_DIR}/crl.pem"):
            (stage / name).chmod(PUBLIC)
        (stage / BROKER_CRL_DIR).chmod(0o755)
        if manufacturers:
            write_new(stage / MANUFACTURERS_FILE, manufacturers)
        write_new(stage / "acl", acl_text(gateway_identities(home), sparkplug_nodes(home)).encode())
        (stage / "data").mkdir(mode=0o700)
        (stage / RUN_DIR).mkdir(mode=0o755)
        plugin = find_dynsec_plugin()
        if plugin is not None:
            # The plugin rewrites this file on every change, so it lives in data/ (the broker's to write).
            write_new(stage / "data" / DYNSEC_FILE, dynsec_config().encode(), mode=PRIVATE)
        else:
            warnings_pre.append(
                "mosquitto's dynamic-security plugin was not found: a revoked device stays connected "
                "until its connection drops (new connections are still refused by the CRL)"
            )
        write_new(stage / "mosquitto.conf",
                  _conf(out, port=port, listen=listen, user=user, plugin=plugin,
                        enroll_port=enroll_port).encode())
        if owner is not None:
            uid, gid = owner
            # The broker must read its key but not change its own configuration.
            os.chown(stage / "server.key", 0, gid)
            (stage / "server.key").chmod(0o640)
            os.chown(stage / "data", uid, gid)
            os.chown(stage / RUN_DIR, uid, gid)
            if plugin is not None:
                os.chown(stage / "data" / DYNSEC_FILE, uid, gid)
            home_uid = home.root.stat().st_uid
            os.chown(stage / BROKER_CRL_DIR, home_uid, -1)
            os.chown(stage / BROKER_CRL_DIR / "crl.pem", home_uid, -1)
        # Traversable by the home's owner (for crl/); the only secret, server.key, is not world-readable.
        stage.chmod(0o755)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            stage.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            stage.rename(out)
    add_crl_target(home, out)
    # A CRL issued now, not the copy from `ca init`: certificates whose rotation grace ended are listed.
    warnings = warnings_pre + write_crl(home)
    return BrokerConfig(out, out / "mosquitto.conf", out / "acl", tuple(warnings))


def refresh_acls(home: Home) -> tuple[list[Path], list[str]]:
    """Rewrite the ACL in every broker folder made by `sgw broker config` (after add-instance).

    Returns (folders rewritten, warnings); the broker reads the new ACL on its next reload (SIGHUP).
    """
    text = acl_text(gateway_identities(home), sparkplug_nodes(home)).encode()
    done, warnings = [], []
    for target in crl_targets(home):
        if not (target / "acl").exists():
            continue
        try:
            write_atomic(target / "acl", text, mode=0o644)
            done.append(target)
        except OSError as exc:
            warnings.append(f"could not update {target / 'acl'} ({exc.strerror or exc}); "
                            f"re-run 'sgw broker config --out {target} --force' as its owner")
    return done, warnings


def manufacturers_pem(home: Home) -> bytes:
    """The allow-listed manufacturer CAs, concatenated PEM (the enrollment listener's cafile)."""
    if not home.registry_path.exists():
        return b""
    with home.open_registry() as registry:
        return b"".join(cert_pem(c.cert) for c in EnrollmentStore(registry).cas())


def refresh_manufacturers(home: Home) -> tuple[list[Path], list[str]]:
    """Rewrite manufacturers.crt in every broker folder that has an enrollment listener (after `sgw
    enroll allow` or `remove`). mosquitto 2.0 reads a listener's cafile at start: restart it."""
    pem = manufacturers_pem(home)
    done, warnings = [], []
    for target in crl_targets(home):
        if not (target / MANUFACTURERS_FILE).exists():
            continue
        if not pem:
            warnings.append(f"{target}: no manufacturer CA is allow-listed any more; the enrollment listener "
                            "keeps its last CA file until 'sgw broker config' is run without --enroll-port")
            continue
        try:
            write_atomic(target / MANUFACTURERS_FILE, pem, mode=PUBLIC)
            done.append(target)
        except OSError as exc:
            warnings.append(f"could not update {target / MANUFACTURERS_FILE} ({exc.strerror or exc})")
    return done, warnings


def _owner(user: str) -> tuple[int, int] | None:
    """uid/gid to hand files to, or None when no ownership change is needed or possible."""
    if user == "root" or os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ProvisioningError(f"user {user!r} does not exist (create it, or pass --user)") from None
    grp.getgrgid(entry.pw_gid)
    return entry.pw_uid, entry.pw_gid


def _enroll_listener(out: Path, port: int | None, listen: str) -> str:
    if port is None:
        return ""
    return f"""
# Zero-touch enrollment (`sgw enroll serve`; docs/PROTOCOL.md, "Enrollment"): only IDevIDs issued by an
# allow-listed manufacturer CA get through TLS here, and the ACL lets each use only its own two
# enrollment topics. The username is the whole certificate subject (RFC 2253), never a bare CN, so an
# IDevID cannot take an sgw identity's client id. The service checks the chain again itself.
listener {port} {listen}
protocol mqtt
cafile {out / MANUFACTURERS_FILE}
certfile {out / "server.crt"}
keyfile {out / "server.key"}
require_certificate true
use_subject_as_username true
use_username_as_clientid true
max_qos 1
tls_version tlsv1.2
"""


def _conf(out: Path, *, port: int, listen: str, user: str, plugin: Path | None,
          enroll_port: int | None = None) -> str:
    root_note = (
        "# TEST/DEMO ONLY: runs as root. Never use this in production.\n" if user == "root" else ""
    )
    return f"""# Written by `sgw broker config`. Run: mosquitto -c {out / "mosquitto.conf"}
{root_note}# mosquitto drops to this user after start; it must be able to read this folder and write data/.
user {user}
per_listener_settings false
allow_anonymous false
acl_file {out / "acl"}

# `sgw device revoke` sends SIGHUP to the pid here so the broker re-reads the CRL.
pid_file {out / PID_FILE}
{_plugin_lines(out, plugin)}
# sgw telemetry is QoS 1 and never retained: refuse what sgw never uses (a client that publishes QoS 2
# or a retained message is disconnected by the broker).
retain_available false

persistence true
persistence_location {out / "data"}/
autosave_interval 60

log_dest stderr
log_type error
log_type warning
log_type notice
log_type information
log_timestamp true
connection_messages true

# Telemetry is small; refuse anything larger than the gateway would accept anyway (plus headroom).
max_packet_size 131072
# Per client: the gateway's persistent session holds the whole fleet's backlog while no gateway is
# connected. Past this mosquitto drops, and the agents already have their PUBACK: size it for the
# forwarded rate times the longest gateway outage you must survive (docs/OPERATIONS.md, Broker).
max_queued_messages 100000
# mosquitto leaves Nagle on by default; it delayed the second hop (gateway results) by tens of ms
# (docs/PERFORMANCE.md, end-to-end benchmark).
set_tcp_nodelay true

listener {port} {listen}
protocol mqtt
cafile {out / "ca.crt"}
certfile {out / "server.crt"}
keyfile {out / "server.key"}
crlfile {out / BROKER_CRL_DIR / "crl.pem"}
require_certificate true
use_identity_as_username true
# The client id is the certificate CN: a device can only ever connect as itself, so it cannot displace
# another device's session (client-id takeover), and each gateway instance has a CN of its own.
use_username_as_clientid true
max_qos 1
tls_version tlsv1.2
{_enroll_listener(out, enroll_port, listen)}"""


def _plugin_lines(out: Path, plugin: Path | None) -> str:
    if plugin is None:
        return "# (no dynamic-security plugin found: revocation cannot disconnect open connections)\n"
    return (
        "# Dynamic security: only used by `sgw device revoke` (as the sgw-admin identity) to disconnect a\n"
        "# revoked device; every other client is decided by acl_file.\n"
        f"plugin {plugin}\n"
        f"plugin_opt_config_file {out / 'data' / DYNSEC_FILE}\n"
    )
