"""The sans-IO Sparkplug B edge node (gateway/core/sparkplug.py), its bdSeq file, its config and ACL.

Every payload is decoded with an independent Sparkplug B schema (the Eclipse Tahu one, as compiled by the
`sparkplug-b-packets` package from PyPI), not with sgw's own generated code, so these tests also check
that what sgw writes is what the standard schema reads.
"""

from __future__ import annotations

import itertools
import tomllib
from pathlib import Path

import pytest
from sparkplub_b_packets.core import sparkplug_b_pb2 as tahu

from gateway.core import sparkplug as spb
from gateway.errors import ConfigError
from gateway.pki.broker import acl_text
from gateway.pki.sparkplug import SparkplugNode
from gateway.server.config import SparkplugSection
from gateway.server.sparkplug import BdSeqFile

SECOND = 1_000_000_000


def _node(silence_s: float = 10.0) -> spb.EdgeNode:
    return spb.EdgeNode(group_id="plant", edge_node_id="gw-1", gateway_id="gw-1",
                        silence_ns=int(silence_s * SECOND))


def _result(device: str, seq: int = 0, label: str = "normal") -> spb.Result:
    return spb.Result(device_id=device, label=label, confidence=0.75, anomaly_score=1.5, model="classifier",
                      model_version="1.0.0", window_seq=seq, timestamp_ms=1_700_000_000_000 + seq)


def _decode(p: spb.Publish) -> tahu.Payload:
    return tahu.Payload.FromString(p.payload)


def _rebirth() -> bytes:
    cmd = tahu.Payload()
    cmd.metrics.add(name="Node Control/Rebirth", datatype=tahu.Boolean, boolean_value=True)
    return cmd.SerializeToString()


def _metrics(payload: tahu.Payload) -> dict[str, tahu.Payload.Metric]:
    return {m.name: m for m in payload.metrics}


def test_nbirth_carries_bdseq_and_rebirth_and_starts_seq_at_zero() -> None:
    node = _node()
    out = node.connected(7, 1000)
    assert [p.topic for p in out] == ["spBv1.0/plant/NBIRTH/gw-1"]
    birth = _decode(out[0])
    assert birth.seq == 0
    m = _metrics(birth)
    assert m["bdSeq"].datatype == tahu.UInt64
    assert m["bdSeq"].long_value == 7
    assert m["Node Control/Rebirth"].datatype == tahu.Boolean
    assert m["Node Control/Rebirth"].boolean_value is False
    assert m["Node Info/Gateway Id"].string_value == "gw-1"


def test_will_is_ndeath_with_the_same_bdseq_and_no_seq() -> None:
    will = _node().will(7, 1000)
    assert will.topic == "spBv1.0/plant/NDEATH/gw-1"
    assert will.qos == 1
    death = tahu.Payload.FromString(will.payload)
    assert not death.HasField("seq")
    assert [(m.name, m.datatype, m.long_value) for m in death.metrics] == [("bdSeq", tahu.UInt64, 7)]


def test_dbirth_defines_every_metric_with_its_type_then_ddata() -> None:
    node = _node()
    node.connected(0, 1000)
    out = node.results([_result("dev-1", 0), _result("dev-1", 1, "bearing")], SECOND, 1000)
    assert [p.topic for p in out] == ["spBv1.0/plant/DBIRTH/gw-1/dev-1", "spBv1.0/plant/DDATA/gw-1/dev-1"]
    birth, data = (_decode(p) for p in out)
    assert (birth.seq, data.seq) == (1, 2)
    types = {m.name: m.datatype for m in birth.metrics}
    assert types == {
        "Inference/Label": tahu.String, "Inference/Confidence": tahu.Float,
        "Inference/Anomaly Score": tahu.Float, "Inference/Model": tahu.String,
        "Inference/Model Version": tahu.String, "Inference/Window Seq": tahu.UInt64,
        "Agent/Forwarded Fraction": tahu.Float, "Agent/Outbox Messages": tahu.UInt64,
        "Agent/Commissioning": tahu.Boolean,
    }
    # No DeviceStatus yet: the agent's figures are defined but null.
    assert _metrics(birth)["Agent/Outbox Messages"].is_null
    assert _metrics(data)["Inference/Label"].string_value == "bearing"
    assert _metrics(data)["Inference/Window Seq"].long_value == 1
    assert _metrics(data)["Inference/Confidence"].float_value == pytest.approx(0.75)


def test_seq_wraps_after_255() -> None:
    node = _node()
    node.connected(0, 0)
    seqs = [_decode(p).seq for i in range(300) for p in node.results([_result("dev-1", i)], SECOND, 0)]
    assert seqs[:3] == [1, 2, 3]
    assert seqs[254:257] == [255, 0, 1]
    assert all(b == (a + 1) % 256 for a, b in itertools.pairwise(seqs))


def test_status_is_reported_and_kept_for_the_next_birth() -> None:
    node = _node()
    node.connected(0, 0)
    health = spb.Health(forwarded_fraction=0.25, outbox_messages=12, commissioning=True)
    assert node.status("dev-1", health, SECOND, 0) == []  # not born yet: no DDATA before a DBIRTH
    birth = _metrics(_decode(node.results([_result("dev-1")], SECOND, 0)[0]))
    assert birth["Agent/Outbox Messages"].long_value == 12
    assert birth["Agent/Commissioning"].boolean_value is True
    (data,) = node.status("dev-1", spb.Health(0.5, 3, commissioning=False), 2 * SECOND, 0)
    assert data.topic == "spBv1.0/plant/DDATA/gw-1/dev-1"
    assert _metrics(_decode(data))["Agent/Forwarded Fraction"].float_value == pytest.approx(0.5)


def test_silence_gives_ddeath_once_and_a_new_result_rebirths() -> None:
    node = _node(silence_s=2.0)
    node.connected(0, 0)
    node.results([_result("dev-1")], 0, 0)
    assert node.expire(2 * SECOND, 0) == []
    (death,) = node.expire(3 * SECOND, 0)
    assert death.topic == "spBv1.0/plant/DDEATH/gw-1/dev-1"
    assert _decode(death).seq == 2
    assert node.expire(4 * SECOND, 0) == []
    again = node.results([_result("dev-1", 5)], 5 * SECOND, 0)
    assert [p.topic.split("/")[2] for p in again] == ["DBIRTH"]
    node.expire(10 * SECOND, 0)
    assert [p.topic.split("/")[2] for p in node.command(_rebirth(), 0)] == ["NBIRTH"]  # dead stays dead


def test_revoked_device_dies_and_unknown_ids_are_ignored() -> None:
    node = _node()
    node.connected(0, 0)
    node.results([_result("dev-1"), _result("dev-2")], 0, 0)
    out = node.revoked(["dev-2", "never-seen"], 0)
    assert [p.topic for p in out] == ["spBv1.0/plant/DDEATH/gw-1/dev-2"]


def test_rebirth_command_resends_nbirth_and_devices_birth_again() -> None:
    node = _node()
    node.connected(3, 0)
    node.results([_result("dev-1")], 0, 0)
    cmd = tahu.Payload()
    cmd.metrics.add(name="Node Control/Rebirth", datatype=tahu.Boolean, boolean_value=True)
    node.results([_result("dev-2", 4, "bearing")], 0, 0)
    node.revoked(["dev-2"], 0)  # dead: not born again by a rebirth
    nbirth, dbirth = node.command(cmd.SerializeToString(), 0)
    assert nbirth.topic == "spBv1.0/plant/NBIRTH/gw-1"
    assert _decode(nbirth).seq == 0
    assert _metrics(_decode(nbirth))["bdSeq"].long_value == 3  # same connection, same bdSeq
    # Each live device births again at once, with its last result.
    assert dbirth.topic == "spBv1.0/plant/DBIRTH/gw-1/dev-1"
    assert _decode(dbirth).seq == 1
    assert _metrics(_decode(dbirth))["Inference/Window Seq"].long_value == 0
    (data,) = node.results([_result("dev-1", 1)], 0, 0)
    assert data.topic.split("/")[2] == "DDATA"
    assert _decode(data).seq == 2


def test_a_reconnect_births_the_node_and_its_live_devices() -> None:
    node = _node()
    node.connected(0, 0)
    node.results([_result("dev-1")], 0, 0)
    node.disconnected()
    out = node.connected(1, 0)
    assert [p.topic.split("/")[2] for p in out] == ["NBIRTH", "DBIRTH"]
    assert [_decode(p).seq for p in out] == [0, 1]


@pytest.mark.parametrize("payload", [
    b"\xff\xff\xff", b"", b"\x00" * (spb.MAX_NCMD_BYTES + 1),
])
def test_unreadable_commands_do_nothing(payload: bytes) -> None:
    node = _node()
    node.connected(0, 0)
    assert node.command(payload, 0) == []


def test_false_rebirth_or_offline_does_nothing() -> None:
    node = _node()
    cmd = tahu.Payload()
    cmd.metrics.add(name="Node Control/Rebirth", datatype=tahu.Boolean, boolean_value=True)
    assert node.command(cmd.SerializeToString(), 0) == []  # not connected
    node.connected(0, 0)
    cmd.metrics[0].boolean_value = False
    assert node.command(cmd.SerializeToString(), 0) == []


def test_nothing_is_sent_while_offline() -> None:
    node = _node()
    assert node.results([_result("dev-1")], 0, 0) == []
    node.connected(0, 0)
    node.disconnected()
    assert node.results([_result("dev-1")], 0, 0) == []


def test_bdseq_file_counts_up_wraps_and_survives_damage(tmp_path: Path) -> None:
    f = BdSeqFile(tmp_path / "node.bdseq")
    assert [f.next(), f.next()] == [0, 1]
    assert BdSeqFile(tmp_path / "node.bdseq").next() == 2  # a restart continues
    (tmp_path / "node.bdseq").write_text("255\n")
    assert f.next() == 0
    (tmp_path / "node.bdseq").write_text("garbage")
    assert f.next() == 0


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"group_id": "a/b"}, "sparkplug.group_id"),
    ({"group_id": "#"}, "sparkplug.group_id"),
    ({"edge_node_id": "x+y"}, "sparkplug.edge_node_id"),
    ({"silence_s": 0.5}, "sparkplug.silence_s"),
])
def test_sparkplug_config_is_validated(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        SparkplugSection(**kwargs)  # type: ignore[arg-type]


def test_acl_grants_each_edge_node_only_its_own_topics() -> None:
    text = acl_text(["gw-1"], [SparkplugNode("gw-1", "plant", "edge-a")])
    block = text.split("user sgw-sparkplug-gw-1\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert block == [
        "topic write spBv1.0/plant/NBIRTH/edge-a",
        "topic write spBv1.0/plant/NDEATH/edge-a",
        "topic write spBv1.0/plant/DBIRTH/edge-a/+",
        "topic write spBv1.0/plant/DDATA/edge-a/+",
        "topic write spBv1.0/plant/DDEATH/edge-a/+",
        "topic read spBv1.0/plant/NCMD/edge-a",
    ]
    scada = text.split("user sgw-scada\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert scada == ["topic read spBv1.0/#", "topic write spBv1.0/+/NCMD/+", "topic write spBv1.0/STATE/+"]
    observer = text.split("user sgw-observer\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert "topic read spBv1.0/#" in observer


def test_add_sparkplug_issues_identities_enables_the_section_and_is_not_repeated(tmp_path: Path) -> None:
    from gateway.pki.instances import cert_cn
    from gateway.server.config import edge_node_id, load_config
    from tests.support.provision import add_instance, provision, run_cli

    prov = provision(tmp_path / "home", [])
    toml = add_instance(prov, "gw-2")
    rc, out, err = run_cli(["gateway", "add-sparkplug", "gw-2", "--dir", str(prov.home)])
    assert rc == 0, err
    assert cert_cn(prov.home / "sparkplug" / "gw-2" / "client.crt") == "sgw-sparkplug-gw-2"
    assert cert_cn(prov.home / "scada" / "client.crt") == "sgw-scada"
    conf = load_config(toml)
    assert conf.sparkplug.enabled
    assert edge_node_id(conf) == "gw-2"
    assert conf.sparkplug.cert_file == prov.home / "sparkplug" / "gw-2" / "client.crt"
    assert not load_config(prov.gateway_toml).sparkplug.enabled  # gw-1 untouched
    rc, _, err = run_cli(["gateway", "add-sparkplug", "gw-2", "--dir", str(prov.home)])
    assert rc != 0
    assert "already holds" in err
    # The second instance's node reuses the one SCADA identity.
    rc, out, err = run_cli(["gateway", "add-sparkplug", "--dir", str(prov.home), "--json"])
    assert rc == 0, err
    assert '"scada_issued": false' in out


def test_enabled_sparkplug_needs_its_certificate(tmp_path: Path) -> None:
    from gateway.server.config import load_config
    from tests.support.provision import provision

    prov = provision(tmp_path / "home", [])
    text = prov.gateway_toml.read_text().replace("enabled = false", "enabled = true", 1)
    assert tomllib.loads(text)["sparkplug"]["enabled"] is True
    prov.gateway_toml.write_text(text)
    with pytest.raises(ConfigError, match=r"sparkplug\.cert_file: file not found"):
        load_config(prov.gateway_toml)
