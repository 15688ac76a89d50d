"""Issue 14: the MQTT-level holes a device with a valid certificate could use, tried against the real
mosquitto (config from `sgw broker config`), `sgw gateway` and real `sgw agent`s.

1. QoS 0 / QoS 2 / retained telemetry: the gateway answers exactly what MQTT requires (a PUBACK for a
   QoS 0 message is a protocol error that used to make the broker drop the gateway), counts each under
   its own reason and is never disconnected.
2. Client-id takeover: the broker makes the certificate CN the client id, so an attacker asking for the
   victim's client id only displaces its own connections; two gateway instances have their own CNs.
3. Revocation reaches the broker: `sgw device revoke` reloads the CRL and disconnects the device.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from tests.support.agent import scrape
from tests.support.cli import run_cli
from tests.support.hostile import HostileDevice
from tests.support.ledger import System, gateway_toml, running_system
from tests.support.mosquitto import _client, free_port, try_connect

pytestmark = pytest.mark.slow  # 30-second attacks against the whole path, as the issue asks

VICTIM = "dev-victim"
EVIL = "dev-evil"
THIEF = "dev-thief"
ATTACK_S = 30.0
RATE = 10.0  # attacker publishes per second


def gateway_reconnects(system: System, gw: object | None = None) -> float:
    text = str((gw or system.gateway).scrape())  # type: ignore[attr-defined]
    m = re.search(r"(?m)^sgw_gateway_reconnects_total (\S+)$", text)
    assert m, "sgw_gateway_reconnects_total missing"
    return float(m.group(1))


def paced(seconds: float, rate: float, step: Callable[[int], None]) -> int:
    """Calls step(i) `rate` times a second for `seconds`; returns how many calls were made."""
    start = time.monotonic()
    i = 0
    while (due := start + i / rate) < start + seconds:
        time.sleep(max(0.0, due - time.monotonic()))
        step(i)
        i += 1
    return i


class Flooder:
    """One attacker connection that publishes at a QoS (and retain flag) sgw never uses, reconnecting
    whenever the broker drops it; counts what it sent and how often it was disconnected."""

    def __init__(self, system: System, device: str, *, qos: int, retain: bool = False) -> None:
        self.system, self.device, self.qos, self.retain = system, device, qos, retain
        self.sent = 0
        self.disconnects = 0
        self.reasons: set[str] = set()
        self.client: mqtt.Client | None = None

    def _connect(self) -> mqtt.Client:
        result = try_connect(self.system.prov.identity(self.device), self.system.port)
        assert result.ok and result.client is not None, result.reason
        client = result.client

        def on_disconnect(_c: object, _u: object, _f: object, rc: object, _p: object = None) -> None:
            self.disconnects += 1
            self.reasons.add(str(rc))

        client.on_disconnect = on_disconnect
        return client

    def run(self, seconds: float, rate: float) -> None:
        hostile = HostileDevice(self.system.prov.bundle(self.device), self.system.prov.identity(self.device),
                                self.system.port)
        hostile.close()  # only its sealing: the envelopes are valid, the delivery state is the attack
        self.client = self._connect()

        def step(_i: int) -> None:
            assert self.client is not None
            if not self.client.is_connected():
                self.client.loop_stop()
                self.client = self._connect()
            payload = hostile.seal(1)[0]
            info = self.client.publish(hostile.topic, payload, qos=self.qos, retain=self.retain)
            if info.rc == mqtt.MQTT_ERR_SUCCESS:
                self.sent += 1

        paced(seconds, rate, step)
        time.sleep(0.5)
        self.client.on_disconnect = None  # our own DISCONNECT below is not the broker's doing
        self.client.disconnect()
        self.client.loop_stop()


def bad_count(system: System, reason: str) -> float:
    return system.rejections().get(reason, 0.0)


def test_qos0_qos2_floods_and_client_id_takeover_leave_gateway_and_victim_alone(tmp_path: Path) -> None:
    """Default broker config: QoS 0 reaches the gateway (counted bad_qos, never acked); QoS 2 is
    refused by the broker itself (max_qos 1), which disconnects the attacker; a thief asking for the
    victim's client id for 30 s never displaces the victim's agent."""
    with running_system(tmp_path, [VICTIM], extra=(EVIL, "dev-evil2", THIEF)) as system:
        windows = int((ATTACK_S + 8) * 12.5)
        system.start_agent(VICTIM, windows=windows, speed=1.0)
        system.ledger.declare_produced(VICTIM, range(windows))
        system.wait_for(lambda: system.results_for(VICTIM) >= 10, 60, "victim's first results")

        qos0 = Flooder(system, EVIL, qos=0)
        qos2 = Flooder(system, "dev-evil2", qos=2)
        attempts = {"n": 0, "connected": 0}

        def takeover() -> None:
            # The thief's own certificate, the victim's client id, again and again.
            def step(_i: int) -> None:
                client = _client(system.prov.identity(THIEF), VICTIM)
                try:
                    client.connect("127.0.0.1", system.port, keepalive=30)
                    client.loop_start()
                    time.sleep(0.05)
                    attempts["connected"] += int(client.is_connected())
                finally:
                    client.disconnect()
                    client.loop_stop()
                attempts["n"] += 1

            paced(ATTACK_S, 4.0, step)

        threads = [threading.Thread(target=qos0.run, args=(ATTACK_S, RATE)),
                   threading.Thread(target=qos2.run, args=(ATTACK_S, RATE)),
                   threading.Thread(target=takeover)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(ATTACK_S + 30)
        system.wait_for(lambda: bad_count(system, "bad_qos") >= qos0.sent, 15, "every QoS 0 publish counted")

        assert qos0.sent >= ATTACK_S * RATE * 0.9
        assert bad_count(system, "bad_qos") == qos0.sent, "each QoS 0 publish is counted once, as bad_qos"
        assert gateway_reconnects(system) == 0, system.gateway.log()[-2000:]
        # The broker (max_qos 1) refuses QoS 2 at the door: the gateway never sees one.
        assert qos2.disconnects >= 5, (qos2.disconnects, qos2.reasons)
        assert attempts["n"] >= ATTACK_S * 3 and attempts["connected"] >= attempts["n"] * 0.5, attempts

        system.wait_agents(120)
        log = system.agents[VICTIM].log()
        assert "disconnected; reconnecting" not in log, log[-2000:]
        report = system.finish(results_timeout=60).check()
        assert report.lost_total == 0, report.summary()
        broker_log = system.broker.log()
        assert f"Client {VICTIM} already connected" not in broker_log
        assert not [ln for ln in broker_log.splitlines() if "sgw-gateway-gw-1" in ln and "disconnected" in ln]
        print(f"\nQoS 0 x{qos0.sent} -> bad_qos, QoS 2 x{qos2.sent} refused by the broker "
              f"({qos2.disconnects} disconnects: {sorted(qos2.reasons)}), takeover attempts "
              f"{attempts['n']}; gateway reconnects 0; victim {report.summary()}")


def test_qos2_and_retained_on_a_broker_without_those_limits_are_counted_not_fatal(tmp_path: Path) -> None:
    """A broker that lets QoS 2 and retained telemetry through (another MQTT 5 broker, or mosquitto
    without sgw's max_qos/retain_available): the gateway completes the QoS 2 flow, counts every one as
    bad_qos, counts retained ones as retained, and stays connected."""
    with running_system(tmp_path, [VICTIM], extra=(EVIL, "dev-evil2"),
                        broker_drop=("max_qos", "retain_available")) as system:
        windows = int((ATTACK_S + 8) * 12.5)
        system.start_agent(VICTIM, windows=windows, speed=1.0)
        system.ledger.declare_produced(VICTIM, range(windows))
        system.wait_for(lambda: system.results_for(VICTIM) >= 10, 60, "victim's first results")
        qos2 = Flooder(system, EVIL, qos=2)
        retained = Flooder(system, "dev-evil2", qos=1, retain=True)
        threads = [threading.Thread(target=qos2.run, args=(ATTACK_S, RATE)),
                   threading.Thread(target=retained.run, args=(ATTACK_S, 2.0))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(ATTACK_S + 30)
        system.wait_for(lambda: bad_count(system, "bad_qos") >= qos2.sent, 15, "every QoS 2 publish counted")
        # A retained message reaches a live subscriber without the retain flag (MQTT 5, retain-as-published
        # off): only the copy the broker keeps and sends to a new subscription carries it.
        assert bad_count(system, "bad_qos") == qos2.sent
        assert qos2.disconnects == 0 and gateway_reconnects(system) == 0, system.gateway.log()[-2000:]
        system.wait_agents(120)
        ledger = system.finish(results_timeout=60)
        # The retained publishes reached the live gateway as ordinary messages (valid envelopes: they get
        # results); only the victim's windows are in the agents' ledgers.
        ledger.results = [r for r in ledger.results if r.key[0] == VICTIM]
        report = ledger.check()
        assert report.lost_total == 0, report.summary()
        print(f"\nQoS 2 x{qos2.sent} -> bad_qos (PUBREC/PUBCOMP flow), retained x{retained.sent}; "
              f"gateway reconnects 0; victim {report.summary()}")


def test_two_gateway_instances_share_the_load_without_displacing_each_other(tmp_path: Path) -> None:
    devices = ["dev-a", "dev-b", "dev-c"]
    with running_system(tmp_path, devices, instances=("gw-2",)) as system:
        metrics2 = free_port()
        conf2 = gateway_toml(system.prov, "gateway-test-2.toml", metrics_port=metrics2, gateway_id="gw-2")
        gw2 = system._GatewayProc(conf2, metrics2, tmp_path / "gateway-gw-2.log").start()
        system.gateways.append(gw2)
        first = system.gateway
        windows = 150
        for d in devices:
            system.start_agent(d, windows=windows, speed=1.0)
            system.ledger.declare_produced(d, range(windows))
        system.wait_agents(120)
        report = system.finish(results_timeout=60).check()
        assert report.lost_total == 0, report.summary()
        assert gateway_reconnects(system, first) == 0 and gateway_reconnects(system, gw2) == 0
        served = [s.key for s in system.ledger.results]
        assert len(served) == len(set(served)) == windows * len(devices)
        log = system.broker.log()
        assert "gw-1 already connected" not in log and "gw-2 already connected" not in log
        for gw in (first, gw2):
            assert re.search(r'(?m)^sgw_gateway_messages_total\{outcome="accepted"\} [1-9]', gw.scrape()), \
                "both instances take part in the shared subscription"


def test_an_instance_with_another_instances_certificate_refuses_to_start(tmp_path: Path) -> None:
    with running_system(tmp_path, ["dev-a"]) as system:
        conf = gateway_toml(system.prov, "gateway-wrong.toml", metrics_port=free_port())
        conf.write_text(conf.read_text().replace('id = "gw-1"', 'id = "gw-9"'))
        rc, _out, err = run_cli(["gateway", "--config", str(conf)])
        assert rc == 2
        assert "needs CN 'sgw-gateway-gw-9'" in err and "add-instance gw-9" in err, err
        assert gateway_reconnects(system) == 0


def test_revoked_device_is_disconnected_within_a_second_and_refused_after(tmp_path: Path) -> None:
    with running_system(tmp_path, [VICTIM, "dev-bad"]) as system:
        bad_metrics = free_port()
        system.start_agent(VICTIM, windows=250, speed=1.0)
        system.ledger.declare_produced(VICTIM, range(250))
        agent = system.start_agent("dev-bad", windows=None, speed=1.0, metrics_port=bad_metrics)
        system.wait_for(lambda: system.results_for("dev-bad") >= 10, 60, "dev-bad's first results")
        assert scrape(bad_metrics)["sgw_agent_connected"] == 1

        rc, out, err = run_cli(["device", "revoke", "dev-bad", "--dir", str(system.prov.home), "--json"])
        returned = time.monotonic()
        assert rc == 0, err
        assert '"broker_disconnected": true' in out and "broker_reloaded_pids" in out, out
        while scrape(bad_metrics)["sgw_agent_connected"] == 1:
            assert time.monotonic() - returned < 1.0, "still connected 1 s after `sgw device revoke`"
            time.sleep(0.01)
        closed_after = time.monotonic() - returned
        assert "disconnected by administrative action" in system.broker.log()

        # New connections of the revoked identity are refused (CRL reloaded), whatever client id.
        for cid in (None, "dev-bad", "anything"):
            result = try_connect(system.prov.identity("dev-bad"), system.port, client_id=cid, timeout=5)
            assert not result.ok, f"revoked dev-bad connected with client id {cid}"

        # The agent says it is refused, and keeps what it could not deliver.
        def refused() -> float:
            m = scrape(bad_metrics)
            return sum(v for k, v in m.items() if k.startswith("sgw_agent_connect_refused_total"))

        deadline = time.monotonic() + 15
        while refused() < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        m = scrape(bad_metrics)
        assert refused() >= 2, {k: v for k, v in m.items() if "refused" in k}
        assert m["sgw_agent_outbox_messages"] > 0, "the revoked agent must keep what it could not deliver"
        assert "the broker refused this device" in agent.log()
        n_refused = refused()

        system.agents.pop("dev-bad").kill()
        system.wait_agents(120)
        report = system.finish(results_timeout=60)
        report.forwarded = [e for e in report.forwarded if e["device"] == VICTIM]
        report.results = [s for s in report.results if s.key[0] == VICTIM]
        assert report.check().lost_total == 0
        print(f"\nrevoked agent disconnected {closed_after * 1000:.0f} ms after `sgw device revoke` "
              f"returned; refusals counted {n_refused:g}; outbox kept {m['sgw_agent_outbox_messages']:g}")
