"""Sparkplug B output end to end: real mosquitto (from `sgw broker config`), the gateway process, a SCADA
client as `sgw-scada` subscribed to spBv1.0/# that decodes with an independent schema (the Eclipse Tahu
one compiled by `sparkplug-b-packets`). Checks birth/data/death sequences, seq and bdSeq rules, metric
names and types, a rebirth command, revocation, and NDEATH by the Will after a gateway SIGKILL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from sparkplub_b_packets.core import sparkplug_b_pb2 as tahu

from gateway.pb import messages_pb2 as pb
from tests.support.gateway import Device, Env, running_env
from tests.support.mosquitto import TLSIdentity, connect, try_connect
from tests.support.provision import run_cli

pytestmark = pytest.mark.slow
GROUP = "sgw"
EDGE = "gw-1"


@dataclass(frozen=True)
class Msg:
    topic: str
    kind: str
    device: str | None
    payload: tahu.Payload

    def metrics(self) -> dict[str, tahu.Payload.Metric]:
        return {m.name: m for m in self.payload.metrics}


@dataclass
class Scada:
    client: mqtt.Client
    msgs: list[Msg] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> list[Msg]:
        with self.lock:
            return list(self.msgs)

    def wait(self, pred: Callable[[Msg], bool], timeout: float = 20.0, *, after: int = 0) -> Msg:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.snapshot()[after:]:
                if pred(m):
                    return m
            time.sleep(0.05)
        kinds = [(m.kind, m.device) for m in self.snapshot()[after:]]
        raise AssertionError(f"no matching Sparkplug message; got {kinds}")

    def rebirth(self) -> None:
        cmd = tahu.Payload(timestamp=int(time.time() * 1000))
        cmd.metrics.add(name="Node Control/Rebirth", datatype=tahu.Boolean, boolean_value=True)
        info = self.client.publish(f"spBv1.0/{GROUP}/NCMD/{EDGE}", cmd.SerializeToString(), qos=1)
        info.wait_for_publish(10)


def _scada_identity(env: Env) -> TLSIdentity:
    d = env.prov.home / "scada"
    return TLSIdentity("sgw-scada", d / "ca.crt", d / "client.crt", d / "client.key")


def _scada(env: Env) -> Scada:
    client = connect(_scada_identity(env), env.broker.port)
    scada = Scada(client)
    subscribed = threading.Event()

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        m = Msg(msg.topic, parts[2], parts[4] if len(parts) > 4 else None,
                tahu.Payload.FromString(msg.payload))
        with scada.lock:
            scada.msgs.append(m)

    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.subscribe("spBv1.0/#", qos=1)
    assert subscribed.wait(10)
    return scada


def _status(device: Device, *, seen: int, forwarded: int, outbox: int) -> None:
    status = pb.DeviceStatus(state=pb.DeviceStatus.STATE_HEARTBEAT, windows_seen=seen,
                             windows_forwarded=forwarded, outbox_messages=outbox)
    sealed = device.sealer.seal(pb.Plaintext(sealed_at_ns=time.time_ns(), status=status).SerializeToString())
    device.client.publish(device.topic, sealed, qos=1).wait_for_publish(10)


def _check_seq(msgs: list[Msg]) -> None:
    """Sparkplug: NBIRTH has seq 0, every later node message +1 mod 256, NDEATH none."""
    last: int | None = None
    for m in msgs:
        if m.kind in ("NCMD", "DCMD", "STATE"):
            continue  # the host application's, not the edge node's
        if m.kind == "NDEATH":
            assert not m.payload.HasField("seq")
            last = None
            continue
        if m.kind == "NBIRTH":
            assert m.payload.seq == 0
        else:
            assert last is not None, f"{m.kind} before any NBIRTH"
            assert m.payload.seq == (last + 1) % 256, f"{m.kind} seq {m.payload.seq} after {last}"
        last = m.payload.seq


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with running_env(tmp_path, ["dev-1", "dev-2"]) as e:
        rc, out, err = run_cli(["gateway", "add-sparkplug", "--dir", str(e.prov.home)])
        assert rc == 0, err
        assert "enabled = true" in out
        toml = e.prov.gateway_toml
        toml.write_text(toml.read_text().replace("silence_s = 60.0", "silence_s = 2.0"))
        e.broker.reload()
        yield e


def test_sparkplug_births_data_deaths_rebirth_and_will(env: Env) -> None:
    scada = _scada(env)
    gw = env.gateway()
    nbirth = scada.wait(lambda m: m.kind == "NBIRTH")
    assert nbirth.topic == f"spBv1.0/{GROUP}/NBIRTH/{EDGE}"
    bd_seq = nbirth.metrics()["bdSeq"].long_value
    assert nbirth.metrics()["bdSeq"].datatype == tahu.UInt64
    assert nbirth.metrics()["Node Control/Rebirth"].boolean_value is False

    dev1, dev2 = env.device("dev-1"), env.device("dev-2")
    dev1.publish(3)
    dbirth = scada.wait(lambda m: m.kind == "DBIRTH" and m.device == "dev-1")
    types = {m.name: m.datatype for m in dbirth.payload.metrics}
    assert types["Inference/Label"] == tahu.String
    assert types["Inference/Confidence"] == tahu.Float
    assert types["Inference/Anomaly Score"] == tahu.Float
    assert types["Inference/Model Version"] == tahu.String
    assert types["Agent/Forwarded Fraction"] == tahu.Float
    assert types["Agent/Outbox Messages"] == tahu.UInt64
    assert 0.0 <= dbirth.metrics()["Inference/Confidence"].float_value <= 1.0

    # A DeviceStatus of a born device is reported at once.
    _status(dev1, seen=10, forwarded=4, outbox=7)
    data = scada.wait(lambda m: m.kind == "DDATA" and m.device == "dev-1"
                      and "Agent/Outbox Messages" in m.metrics())
    assert data.metrics()["Agent/Outbox Messages"].long_value == 7
    assert data.metrics()["Agent/Forwarded Fraction"].float_value == pytest.approx(0.4)
    n = len(scada.snapshot())
    dev1.publish(2)
    scada.wait(lambda m: m.kind == "DDATA" and m.device == "dev-1" and "Inference/Label" in m.metrics(),
               after=n)

    # Revocation: dev-2 was born, then its registry row says revoked -> DDEATH.
    dev2.publish(1)
    scada.wait(lambda m: m.kind == "DBIRTH" and m.device == "dev-2")
    rc, _, err = run_cli(["device", "revoke", "dev-2", "--dir", str(env.prov.home)])
    assert rc == 0, err
    scada.wait(lambda m: m.kind == "DDEATH" and m.device == "dev-2")

    # Silence: dev-1 sends nothing for more than silence_s -> DDEATH.
    scada.wait(lambda m: m.kind == "DDEATH" and m.device == "dev-1", timeout=10)

    # Rebirth command from the SCADA: NBIRTH again, same bdSeq, seq 0; a device's next result births it.
    n = len(scada.snapshot())
    scada.rebirth()
    again = scada.wait(lambda m: m.kind == "NBIRTH", after=n)
    assert again.metrics()["bdSeq"].long_value == bd_seq
    dev1.publish(1)  # dev-1 was dead (silent): its next result births it
    scada.wait(lambda m: m.kind == "DBIRTH" and m.device == "dev-1", after=n)
    # A second rebirth while dev-1 is live: its DBIRTH follows the NBIRTH without a new result.
    n = len(scada.snapshot())
    scada.rebirth()
    scada.wait(lambda m: m.kind == "NBIRTH", after=n)
    scada.wait(lambda m: m.kind == "DBIRTH" and m.device == "dev-1", after=n, timeout=5)

    # SIGKILL: the broker sends the Will, an NDEATH with this connection's bdSeq.
    n = len(scada.snapshot())
    gw.kill()
    death = scada.wait(lambda m: m.kind == "NDEATH", after=n)
    assert death.topic == f"spBv1.0/{GROUP}/NDEATH/{EDGE}"
    assert death.metrics()["bdSeq"].long_value == bd_seq

    # Restart: a clean birth with the next bdSeq (persisted across the crash).
    n = len(scada.snapshot())
    gw2 = env.gateway()
    reborn = scada.wait(lambda m: m.kind == "NBIRTH", after=n)
    assert reborn.metrics()["bdSeq"].long_value == (bd_seq + 1) % 256
    dev1.publish(1)
    scada.wait(lambda m: m.kind == "DBIRTH" and m.device == "dev-1", after=n)

    # A clean stop (SIGTERM) sends NDEATH too, with the new bdSeq.
    n = len(scada.snapshot())
    assert gw2.stop() == 0
    death2 = scada.wait(lambda m: m.kind == "NDEATH", after=n)
    assert death2.metrics()["bdSeq"].long_value == (bd_seq + 1) % 256
    _check_seq(scada.snapshot())


def test_sparkplug_acl_binds_topics_to_identities(env: Env) -> None:
    """An edge node cannot publish as another node; a device cannot publish Sparkplug; the SCADA can
    read; the observer reads but cannot command."""
    home = env.prov.home
    folder = home / "sparkplug" / "gw-1"
    node = TLSIdentity("sgw-sparkplug-gw-1", home / "ca" / "ca.crt", folder / "client.crt",
                       folder / "client.key")
    scada = _scada(env)
    writers = {"node": node, "device": env.prov.identity("dev-1"), "observer": env.prov.identity("observer")}
    for name, ident in writers.items():
        result = try_connect(ident, env.broker.port)
        assert result.ok and result.client is not None, name
        payload = tahu.Payload(seq=0).SerializeToString()
        result.client.publish(f"spBv1.0/{GROUP}/NBIRTH/other-edge", payload, qos=1).wait_for_publish(5)
        result.client.publish(f"spBv1.0/{GROUP}/NCMD/{EDGE}", payload, qos=1).wait_for_publish(5)
        if name == "node":
            result.client.publish(f"spBv1.0/{GROUP}/DDATA/{EDGE}/dev-1", payload, qos=1).wait_for_publish(5)
        result.client.disconnect()
        result.client.loop_stop()
    time.sleep(1.0)
    topics = [m.topic for m in scada.snapshot()]
    # Only the edge node's write to its own device topic went through.
    assert topics == [f"spBv1.0/{GROUP}/DDATA/{EDGE}/dev-1"]
