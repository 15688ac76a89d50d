"""A real mosquitto started from `sgw broker config`: mutual TLS, CN as username, the ACL, the CRL.

Delivery checks never wait for "nothing to arrive": each negative case is followed by an allowed
message on the same path (a marker), and the test asserts the marker is the first thing received.
"""

from __future__ import annotations

import os
import pwd
import queue
import shutil
import stat
import tempfile
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from tests.support.mosquitto import (
    Mosquitto,
    TLSIdentity,
    connect,
    disconnect,
    free_port,
    try_connect,
)
from tests.support.provision import provision, run_cli

NOT_AUTHORIZED = 0x87
TIMEOUT = 10.0


class Probe:
    """A connected MQTT 5 client that records PUBACK reason codes and received messages."""

    def __init__(self, identity: TLSIdentity, port: int) -> None:
        self.client = connect(identity, port)
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._acks: dict[int, int] = {}
        self._subs: dict[int, list[int]] = {}
        self._cv = threading.Condition()
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe

    def _on_message(self, c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        self.messages.put((msg.topic, msg.payload))

    def _on_publish(self, c: mqtt.Client, u: object, mid: int, rc: object, props: object) -> None:
        with self._cv:
            self._acks[mid] = int(getattr(rc, "value", 0))
            self._cv.notify_all()

    def _on_subscribe(self, c: mqtt.Client, u: object, mid: int, rcs: list[object], props: object) -> None:
        with self._cv:
            self._subs[mid] = [int(getattr(rc, "value", 0)) for rc in rcs]
            self._cv.notify_all()

    def publish(self, topic: str, payload: bytes = b"x") -> int:
        """QoS 1 publish; returns the PUBACK reason code (0 or 0x10 = accepted, 0x87 = not authorized)."""
        info = self.client.publish(topic, payload, qos=1)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS
        with self._cv:
            assert self._cv.wait_for(lambda: info.mid in self._acks, TIMEOUT), f"no PUBACK for {topic}"
            return self._acks.pop(info.mid)

    def subscribe(self, *topics: str) -> list[int]:
        _, mid = self.client.subscribe([(t, 1) for t in topics])
        with self._cv:
            assert self._cv.wait_for(lambda: mid in self._subs, TIMEOUT), "no SUBACK"
            return self._subs.pop(mid)

    def next(self) -> tuple[str, bytes]:
        return self.messages.get(timeout=TIMEOUT)

    def close(self) -> None:
        disconnect(self.client)


def accepted(rc: int) -> bool:
    return rc < 0x80


@pytest.fixture
def probes(sgw_env):  # type: ignore[no-untyped-def]
    made: list[Probe] = []

    def make(name: str) -> Probe:
        probe = Probe(sgw_env.prov.identity(name), sgw_env.port)
        made.append(probe)
        return probe

    yield make
    for probe in made:
        probe.close()


def test_device_publishes_to_its_own_topic_and_the_gateway_reads_it(probes) -> None:  # type: ignore[no-untyped-def]
    gateway = probes("gateway")
    gateway.subscribe("$share/sgw/sgw/v1/dev/+/up")
    device = probes("dev-0001")
    assert accepted(device.publish("sgw/v1/dev/dev-0001/up", b"hello"))
    assert gateway.next() == ("sgw/v1/dev/dev-0001/up", b"hello")


def test_device_is_refused_on_other_topics(probes) -> None:  # type: ignore[no-untyped-def]
    gateway = probes("gateway")
    gateway.subscribe("sgw/v1/dev/+/up")
    observer = probes("observer")
    observer.subscribe("sgw/v1/results", "sgw/v1/results/#", "sgw/v1/deadletter")
    device = probes("dev-0001")
    for topic in ("sgw/v1/dev/dev-0002/up", "sgw/v1/dev/dev-0001/cmd", "sgw/v1/results",
                  "sgw/v1/results/json/dev-0001", "sgw/v1/deadletter", "sgw/v1/dev/dev-0001/up/x",
                  "sgw/v1/dev/dev-0001", "elsewhere"):
        assert device.publish(topic, b"forged") == NOT_AUTHORIZED, topic
    assert accepted(device.publish("sgw/v1/dev/dev-0001/up", b"marker"))
    assert gateway.next() == ("sgw/v1/dev/dev-0001/up", b"marker")
    # The observer saw none of the forged results; the gateway's real result is the first it gets.
    assert accepted(gateway.publish("sgw/v1/results", b"result"))
    assert observer.next() == ("sgw/v1/results", b"result")


def test_device_reads_only_its_own_command_topic(probes) -> None:  # type: ignore[no-untyped-def]
    gateway = probes("gateway")
    other = probes("dev-0002")
    device = probes("dev-0001")
    device.subscribe("sgw/v1/dev/+/cmd", "sgw/v1/dev/+/up", "sgw/v1/results", "sgw/v1/#")
    assert accepted(other.publish("sgw/v1/dev/dev-0002/up", b"other-telemetry"))
    assert accepted(gateway.publish("sgw/v1/results", b"result"))
    assert accepted(gateway.publish("sgw/v1/dev/dev-0002/cmd", b"not-yours"))
    assert accepted(gateway.publish("sgw/v1/dev/dev-0001/cmd", b"yours"))
    assert device.next() == ("sgw/v1/dev/dev-0001/cmd", b"yours")


def test_service_identities(probes) -> None:  # type: ignore[no-untyped-def]
    gateway = probes("gateway")
    observer = probes("observer")
    for topic in ("sgw/v1/results", "sgw/v1/results/json/dev-0001", "sgw/v1/deadletter",
                  "sgw/v1/dev/dev-0001/cmd"):
        assert accepted(gateway.publish(topic)), topic
    # The gateway cannot impersonate a device's telemetry.
    assert gateway.publish("sgw/v1/dev/dev-0001/up") == NOT_AUTHORIZED
    for topic in ("sgw/v1/results", "sgw/v1/dev/dev-0001/up", "sgw/v1/dev/dev-0001/cmd", "sgw/v1/deadletter"):
        assert observer.publish(topic) == NOT_AUTHORIZED, topic
    observer.subscribe("sgw/v1/dev/+/up", "sgw/v1/dev/+/cmd", "sgw/v1/results/#")
    device = probes("dev-0003")
    assert accepted(device.publish("sgw/v1/dev/dev-0003/up", b"telemetry"))
    assert accepted(gateway.publish("sgw/v1/dev/dev-0003/cmd", b"cmd"))
    assert accepted(gateway.publish("sgw/v1/results/json/dev-0003", b"json"))
    assert observer.next() == ("sgw/v1/results/json/dev-0003", b"json")


def test_clients_without_a_valid_certificate_are_refused(sgw_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = try_connect(sgw_env.prov.anonymous(), sgw_env.port)
    assert not result.ok
    # A certificate from another sgw CA, with a device id the broker knows, is refused too.
    foreign = provision(tmp_path / "foreign", ["dev-0001"])
    ident = foreign.identity("dev-0001")
    result = try_connect(TLSIdentity("foreign", sgw_env.prov.ca_file, ident.cert_file, ident.key_file),
                         sgw_env.port)
    assert not result.ok


def test_revoked_and_removed_devices_are_refused_after_reload(make_env) -> None:  # type: ignore[no-untyped-def]
    env = make_env(["dev-a", "dev-b", "dev-c"])
    for name in ("dev-a", "dev-b", "dev-c"):
        disconnect(connect(env.prov.identity(name), env.port))
    assert run_cli(["device", "revoke", "dev-a", "--dir", str(env.home)])[0] == 0
    # rm deletes the bundle, so keep a copy of the credentials an attacker might still hold.
    kept = env.home.parent / "kept-dev-b"
    shutil.copytree(env.prov.bundle("dev-b"), kept)
    assert run_cli(["device", "remove", "dev-b", "--dir", str(env.home)])[0] == 0
    env.broker.reload()
    assert not try_connect(env.prov.identity("dev-a"), env.port).ok
    assert not try_connect(TLSIdentity("dev-b", kept / "ca.crt", kept / "device.crt", kept / "device.key"),
                           env.port).ok
    disconnect(connect(env.prov.identity("dev-c"), env.port))
    assert "certificate revoked" in env.broker.log() or "verify failed" in env.broker.log()


def test_rotation_old_certificate_refused_once_grace_is_over(make_env) -> None:  # type: ignore[no-untyped-def]
    env = make_env(["dev-a"])
    bundle = env.prov.bundle("dev-a")
    old = env.home.parent / "old-dev-a"
    shutil.copytree(bundle, old)
    old_ident = TLSIdentity("dev-a", old / "ca.crt", old / "device.crt", old / "device.key")
    assert run_cli(["device", "rotate", "dev-a", "--grace", "3600", "--dir", str(env.home)])[0] == 0
    env.broker.reload()
    disconnect(connect(old_ident, env.port))  # still inside the grace period
    disconnect(connect(env.prov.identity("dev-a"), env.port))
    assert run_cli(["device", "rotate", "dev-a", "--grace", "0", "--dir", str(env.home)])[0] == 0
    env.broker.reload()
    assert not try_connect(old_ident, env.port).ok
    probe = Probe(env.prov.identity("dev-a"), env.port)
    try:
        assert accepted(probe.publish("sgw/v1/dev/dev-a/up"))
    finally:
        probe.close()


def test_production_config_does_not_run_as_root(tmp_path: Path) -> None:
    home = provision(tmp_path / "home", ["dev-p"]).home
    out = tmp_path / "broker"
    rc, _, err = run_cli(["broker", "config", "--out", str(out), "--dir", str(home)])
    assert rc == 0, err
    conf = (out / "mosquitto.conf").read_text()
    lines = set(conf.splitlines())
    for needed in ("user mosquitto", "allow_anonymous false", "require_certificate true",
                   "use_identity_as_username true", "tls_version tlsv1.2", "persistence true",
                   f"crlfile {out / 'crl' / 'crl.pem'}", f"acl_file {out / 'acl'}"):
        assert needed in lines, needed
    assert "user root" not in conf
    acl = (out / "acl").read_text()
    assert "pattern write sgw/v1/dev/%u/up" in acl and "pattern read sgw/v1/dev/%u/cmd" in acl
    assert "topic read sgw/v1/dev/+/up" in acl
    assert "#" not in [line.split()[-1] for line in acl.splitlines() if line.startswith(("topic", "pattern"))]
    # Revocation refreshes the broker's copy of the CRL.
    before = (out / "crl" / "crl.pem").read_bytes()
    assert run_cli(["device", "revoke", "dev-p", "--dir", str(home)])[0] == 0
    assert (out / "crl" / "crl.pem").read_bytes() != before
    assert (out / "crl" / "crl.pem").read_bytes() == (home / "ca" / "crl.pem").read_bytes()
    # Refuses to overwrite an existing broker folder unless told to.
    assert run_cli(["broker", "config", "--out", str(out), "--dir", str(home)])[0] == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_production_config_drops_to_the_mosquitto_user(tmp_path: Path) -> None:
    try:
        mosq = pwd.getpwnam("mosquitto")
    except KeyError:
        pytest.skip("no mosquitto user")
    port = free_port()
    prov = provision(tmp_path / "home", ["dev-u"], broker_port=port)
    # pytest's temp folders are 0700 root; the broker folder must be reachable by the mosquitto user.
    parent = Path(tempfile.mkdtemp(prefix="sgw-broker-"))
    try:
        parent.chmod(0o755)
        out = parent / "broker"
        # As in production, the home belongs to a service user (sgw) while root writes the broker folder.
        os.chown(prov.home, 65534, -1)
        rc, _, err = run_cli(["broker", "config", "--out", str(out), "--port", str(port), "--dir",
                              str(prov.home)])
        assert rc == 0, err
        # crl/ belongs to the home's owner, who replaces crl.pem there by rename on every revocation.
        assert (out / "crl").stat().st_uid == 65534
        key = out / "server.key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o640 and key.stat().st_gid == mosq.pw_gid
        assert (out / "data").stat().st_uid == mosq.pw_uid
        with Mosquitto(out / "mosquitto.conf", port=port, log_path=parent / "log") as broker:
            status = Path(f"/proc/{broker.pid}/status").read_text()
            uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
            assert int(uid) == mosq.pw_uid
            disconnect(connect(prov.identity("dev-u"), port))
            assert "Unable to load" not in broker.log()
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_broker_can_be_paused_and_restarted(make_env) -> None:  # type: ignore[no-untyped-def]
    env = make_env(["dev-a"])
    env.broker.pause()
    env.broker.resume()
    env.broker.restart()
    disconnect(connect(env.prov.identity("dev-a"), env.port))
    env.broker.kill()
    assert not env.broker.alive
