"""`--attack`: a device with a valid certificate and valid keys that misbehaves on its own topic.

The broker lets it publish to `sgw/v1/dev/{its id}/up` (it is provisioned), so everything it sends reaches
the gateway, whose pipeline must refuse each kind of abuse under its own reason:

| what it sends                                                   | expected reason |
|-----------------------------------------------------------------|-----------------|
| an envelope it sent (and the gateway accepted) a moment earlier | `replay`        |
| a freshly sealed envelope with one ciphertext bit flipped        | `bad_auth`      |
| an envelope of 96 KiB (broker allows 128 KiB, gateway 64 KiB)   | `too_large`     |
| random bytes that are no envelope at all                        | `malformed`     |
| a valid envelope published at QoS 0 (sgw telemetry is QoS 1)   | `bad_qos`       |
| a downlink message it received (receipt or command), replayed up | `unsupported_version` |

At the MQTT layer it also tries what the broker itself refuses (issue 14), counted on its side:

| what it does                                     | what happens                                         |
|--------------------------------------------------|------------------------------------------------------|
| publishes at QoS 2                               | mosquitto (`max_qos 1`) disconnects it               |
| connects asking for an honest device's client id | it gets its own CN as client id; the victim stays on |
| replays a captured downlink message to the victim | the broker's ACL refuses it (PUBACK 0x87)           |

It also sends one valid window per round, so its replays have something real to copy, and so the demo
shows that abuse does not lock the device's honest traffic out.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import tomllib
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from gateway.common.mqtt import TlsFiles, check, make_client, set_nodelay
from gateway.core import codec, keys
from gateway.core import envelope as ev
from gateway.core.session import Sealer
from gateway.core.topics import cmd_topic_for
from gateway.pb import messages_pb2
from gateway.sim.generator import Generator

EXPECTED_REASONS = ("bad_auth", "bad_qos", "malformed", "replay", "too_large", "unsupported_version")
# Needs a gateway that sends the hostile device receipts to reflect (absent in a broker-only test).
NEEDS_GATEWAY = ("unsupported_version",)
OVERSIZED_BYTES = 96 * 1024
ROUND_S = 0.5


class HostileDevice:
    def __init__(self, bundle: Path, *, host: str, port: int, victim: str | None = None) -> None:
        conf = tomllib.loads((bundle / "agent.toml").read_text())
        self.device_id: str = conf["device"]["id"]
        e2e = conf["e2e"]
        self._sealer = Sealer(
            device_id=self.device_id,
            device_key=keys.private_from_bytes((bundle / e2e["device_key_file"]).read_bytes()),
            device_key_id=int(e2e["device_key_id"]),
            gateway_public=(bundle / e2e["gateway_public_key_file"]).read_bytes(),
            gateway_key_id=int(e2e["gateway_key_id"]),
            epoch=time.time_ns(),
        )
        self._files = files = TlsFiles(bundle / "ca.crt", bundle / "device.crt", bundle / "device.key")
        self.victim = victim
        self._client = make_client(self.device_id, files)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._downlink: deque[bytes] = deque(maxlen=8)  # sealed messages the gateway sent it
        self._replay_mids: set[int] = set()
        # The broker drops it for each QoS 2 publish (and for its own takeover attempts): come back fast.
        self._client.reconnect_delay_set(min_delay=1, max_delay=2)
        self._host, self._port = host, port
        self._topic = f"sgw/v1/dev/{self.device_id}/up"
        self._gen = Generator(seed=666)
        self._captured: deque[bytes] = deque(maxlen=32)
        self._seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hostile-device", daemon=True)
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self.sent: Counter[str] = Counter()

    def start(self) -> None:
        self._client.connect(self._host, self._port, keepalive=30)
        check(self._client.loop_start(), "hostile loop_start")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            self._client.disconnect()
        with contextlib.suppress(Exception):
            self._client.loop_stop()

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.sent)

    def _on_connect(self, client: paho.Client, _ud: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if not getattr(reason, "is_failure", False):
            set_nodelay(client)
            client.subscribe(cmd_topic_for(self.device_id), qos=1)  # its own: receipts and commands
            self._connected.set()

    def _on_message(self, _c: paho.Client, _ud: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self._downlink.append(bytes(msg.payload))

    def _on_publish(self, _c: paho.Client, _ud: Any, mid: int, reason: Any, _props: Any) -> None:
        with self._lock:
            if mid in self._replay_mids:
                self._replay_mids.discard(mid)
                if getattr(reason, "is_failure", False):
                    self.sent["downlink_replay_refused_by_broker"] += 1

    def _on_disconnect(self, _c: paho.Client, _ud: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if self._stop.is_set():
            return
        with self._lock:
            self.sent["disconnected_by_broker"] += 1

    def _valid(self) -> bytes:
        now = time.time_ns()
        window = codec.encode_window(
            self._gen.window("healthy"), kind="vibration", sample_rate_hz=self._gen.sample_rate_hz,
            start_ns=now - int(self._gen.window_len / self._gen.sample_rate_hz * 1e9),
            window_seq=self._seq, reason="anomaly", prefilter_version="hostile",
        )
        self._seq += 1
        return self._sealer.seal(messages_pb2.Plaintext(sealed_at_ns=now, window=window).SerializeToString())

    def _send(self, kind: str, payload: bytes, qos: int = 1) -> None:
        if not self._client.is_connected():
            return  # paho would queue it for the next connection: counts must match what was sent
        info = self._client.publish(self._topic, payload, qos=qos)
        if info.rc == paho.MQTT_ERR_SUCCESS:
            with self._lock:
                self.sent[kind] += 1

    @contextlib.contextmanager
    def _throwaway(self, client_id: str) -> Iterator[paho.Client | None]:
        """A second, short connection with the device's own certificate: the client once connected (or
        None if the broker did not take it), closed on exit. The broker makes its CN the client id, so
        it also closes the main connection once (one identity, one connection)."""
        client = make_client(client_id, self._files)
        dropped = threading.Event()
        client.on_disconnect = lambda *_a: dropped.set()
        client.user_data_set(dropped)
        try:
            try:
                client.connect(self._host, self._port, keepalive=30)
            except OSError:
                connected = False
            else:
                client.loop_start()
                time.sleep(0.2)
                connected = client.is_connected()
            yield client if connected else None
        finally:
            with contextlib.suppress(Exception):
                client.disconnect()
            client.loop_stop()

    def _qos2(self) -> None:
        """A QoS 2 publish, mosquitto (max_qos 1) disconnects it. From a throwaway connection, not the
        main client, whose paho session would resend the unfinished QoS 2 message on every reconnect
        and be disconnected again and again."""
        payload = self._valid()
        with self._throwaway(self.device_id) as probe:
            if probe is None:
                return
            probe.publish(self._topic, payload, qos=2)
            with self._lock:
                self.sent["qos2"] += 1
            if probe.user_data_get().wait(1.0):  # mosquitto: "Too high QoS in PUBLISH ..., disconnecting"
                with self._lock:
                    self.sent["qos2_refused_by_broker"] += 1

    def _takeover(self) -> None:
        """Connect with its own certificate asking for the victim's client id, as an attacker would."""
        with self._throwaway(self.victim or "x") as thief:
            if thief is not None:
                with self._lock:
                    self.sent["takeover_attempt"] += 1

    def _round(self, n: int) -> None:
        # Replays copy what went out at least one round ago: by then the gateway has accepted it, so the
        # copy is refused as a replay and not raced against its original.
        if self._captured and n % 2 == 1:
            self._send("replay", self._captured[0])
        honest = self._valid()
        self._send("valid", honest)
        self._captured.append(honest)
        forged = bytearray(self._valid())  # a counter of its own, never sent intact
        forged[-1] ^= 0x01  # in the AEAD tag: the header still parses, only authentication fails
        self._send("forged", bytes(forged))
        if n % 4 == 2:
            head, _ = ev.split_envelope(honest) or (b"", b"")
            self._send("oversized", ev.encode_envelope(head, os.urandom(OVERSIZED_BYTES)))
        if n % 2 == 0:
            self._send("garbage", b"\xff" + os.urandom(47))
        self._send("qos0", self._valid(), qos=0)
        if n % 16 == 7:
            self._qos2()
        if n % 16 == 15 and self.victim:
            self._takeover()
        if n % 8 == 3:
            self._replay_downlink()

    def _replay_downlink(self) -> None:
        """A captured downlink message, sent on to the victim (the ACL refuses) and up as telemetry
        (the gateway refuses suite 2 as unsupported_version): a sealed direction cannot be reflected."""
        with self._lock:
            captured = self._downlink[-1] if self._downlink else None
        if captured is None or not self._client.is_connected():
            return
        if self.victim:
            info = self._client.publish(cmd_topic_for(self.victim), captured, qos=1)
            if info.rc == paho.MQTT_ERR_SUCCESS:
                with self._lock:
                    self._replay_mids.add(info.mid)
                    self.sent["downlink_replay"] += 1
        self._send("downlink_reflected", captured)

    def _run(self) -> None:
        if not self._connected.wait(timeout=15):
            return
        n = 0
        while not self._stop.wait(ROUND_S):
            self._round(n)
            n += 1
