"""The Sparkplug B identities of a home: `sgw gateway add-sparkplug [ID]`.

Two kinds (docs/OPERATIONS.md, "SCADA"): each gateway instance's edge node connects as
`sgw-sparkplug-<gateway.id>` (HOME/sparkplug/<id>/), a connection of its own because the broker allows
one per CN and the edge node's NDEATH is that connection's Will; the plant's SCADA or host application
connects as `sgw-scada` (HOME/scada/), which may read every Sparkplug topic and send node commands. The
set of edge nodes, and the group and edge node ids their ACL entries name, are read from the identity
folders and each instance's gateway.toml (one source of truth, as for instances).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from gateway.common import tomledit
from gateway.errors import ProvisioningError
from gateway.pki.ca import cert_pem, ec_key_pem
from gateway.pki.files import PRIVATE_DIR, staging_dir
from gateway.pki.home import Home, write_pair
from gateway.pki.instances import gateway_instances, instance_toml
from gateway.registry.ids import SCADA_CN, is_sparkplug_id, sparkplug_cn


@dataclass(frozen=True)
class SparkplugNode:
    gateway_id: str
    group_id: str
    edge_node_id: str


@dataclass(frozen=True)
class AddedSparkplug:
    node: SparkplugNode
    cert: Path
    scada_cert: Path
    scada_issued: bool
    config: Path
    enabled: bool  # add-sparkplug switched [sparkplug] enabled on in the instance's toml


def sparkplug_root(home: Home) -> Path:
    return home.root / "sparkplug"


def scada_dir(home: Home) -> Path:
    return home.root / "scada"


def _node_of(home: Home, gateway_id: str) -> SparkplugNode:
    path = instance_toml(home, gateway_id)
    try:
        section = tomllib.loads(path.read_text()).get("sparkplug", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ProvisioningError(f"{path}: cannot read the [sparkplug] section ({exc})") from None
    group = section.get("group_id", "sgw")
    edge = section.get("edge_node_id", "") or gateway_id
    for key, value in (("group_id", group), ("edge_node_id", edge)):
        if not isinstance(value, str) or not is_sparkplug_id(value):
            raise ProvisioningError(f"{path}: sparkplug.{key} {value!r} is not a valid Sparkplug id")
    return SparkplugNode(gateway_id, group, edge)


def sparkplug_nodes(home: Home) -> list[SparkplugNode]:
    """The gateway instances that have an edge node identity, in instance order."""
    root = sparkplug_root(home)
    return [_node_of(home, gid) for gid in gateway_instances(home) if (root / gid / "client.crt").exists()]


def add_sparkplug(home: Home, gateway_id: str) -> AddedSparkplug:
    """Issue the edge node identity of one instance (and sgw-scada once), switch its [sparkplug] on."""
    ca = home.require_ca()
    if gateway_id not in gateway_instances(home):
        raise ProvisioningError(f"no gateway instance {gateway_id} (see 'sgw gateway instances')")
    node = _node_of(home, gateway_id)
    folder = sparkplug_root(home) / gateway_id
    if (folder / "client.crt").exists():
        raise ProvisioningError(f"{folder} already holds the Sparkplug identity of {gateway_id}")
    sparkplug_root(home).mkdir(mode=PRIVATE_DIR, exist_ok=True)
    issued = ca.issue(sparkplug_cn(gateway_id))
    scada = scada_dir(home)
    scada_issued = not (scada / "client.crt").exists()
    with staging_dir(home.root, "add-sparkplug") as stage:
        write_pair(stage / "node", "client", cert_pem(issued.cert), ec_key_pem(issued.key))
        if scada_issued:
            pair = ca.issue(SCADA_CN)
            write_pair(stage / "scada", "client", cert_pem(pair.cert), ec_key_pem(pair.key))
            (stage / "scada" / "ca.crt").write_bytes(home.ca_cert.read_bytes())
            (stage / "scada").rename(scada)
        (stage / "node").rename(folder)
    config = instance_toml(home, gateway_id)
    text = config.read_text()
    # Only an `enabled = false` sgw can find: a section it cannot read is left as it is and the CLI says
    # what to change.
    enable = tomledit.get(text, "sparkplug", "enabled") is False
    if enable:
        config.write_text(tomledit.set_keys(text, {"sparkplug": {"enabled": True}}))
    return AddedSparkplug(node, folder / "client.crt", scada / "client.crt", scada_issued, config,
                          enabled=enable)
