"""A hostile device for tests: it holds a valid certificate and its own valid e2e keys (a provisioned
bundle), connects like an agent, and then misbehaves on purpose.

Each attack is a method that builds its payloads, publishes them at QoS 1 and returns what happened at
the broker (the PUBACK reason codes), so a test can pair it with the gateway's rejection counters:

- `foreign_topic(victim)`: a valid envelope on another device's topic -> broker ACL (PUBACK 0x87)
- `replay(envs)`: envelopes it sent before (already accepted) -> `replay`
- `bit_flipped(n)`: fresh envelopes with one ciphertext/tag bit flipped -> `bad_auth`
- `truncated(n)`, `garbage(n)`: envelopes cut short, random bytes -> `malformed`
- `oversized(n)`: a well-framed 96 KiB envelope (the broker allows 128 KiB) -> `too_large`
- `impersonate(victim)`: the victim's id in the header, sealed with its own key, on its own topic ->
  `topic_mismatch` (before any key work: the topic is the broker-authenticated identity)
- `stolen_key(bundle)`: genuine envelopes of another device (its e2e key stolen, not its certificate)
  on its own topic, since the broker will not let it publish on the victim's -> `topic_mismatch`
- `old_session(envs)`: withheld envelopes of an earlier session (lower epoch) -> `stale_session`;
  after `sgw device rotate`, anything sealed with its old key -> `bad_auth` (the key floor)
- `flood(rate, seconds)`: valid windows at 10x its normal rate -> `rate_limited`

Sessions are explicit (`new_session()`), so a test can seal with an old session, withhold envelopes,
or rotate keys between sessions. Every wait is bounded; `close()` disconnects.
"""

from __future__ import annotations

import os
import threading
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt

from gateway.core import codec, keys
from gateway.core import envelope as ev
from gateway.core.session import Sealer
from gateway.pb import messages_pb2 as pb
from gateway.sim.generator import Generator
from tests.support.mosquitto import TLSIdentity, connect, disconnect

OVERSIZED_BYTES = 96 * 1024  # over the gateway's 64 KiB, under the broker's 128 KiB packet limit
PUBACK_NOT_AUTHORIZED = 0x87


def topic_of(device_id: str) -> str:
    return f"sgw/v1/dev/{device_id}/up"


@dataclass
class Bundle:
    """A device's e2e material as `sgw device add/rotate` wrote it."""

    device_id: str
    device_key: bytes
    device_key_id: int
    gateway_public: bytes
    gateway_key_id: int

    @classmethod
    def load(cls, folder: Path) -> Bundle:
        conf = tomllib.loads((folder / "agent.toml").read_text())
        e2e = conf["e2e"]
        return cls(conf["device"]["id"], (folder / e2e["device_key_file"]).read_bytes(),
                   int(e2e["device_key_id"]), (folder / e2e["gateway_public_key_file"]).read_bytes(),
                   int(e2e["gateway_key_id"]))

    def sealer(self, epoch: int, *, device_id: str | None = None) -> Sealer:
        return Sealer(device_id=device_id or self.device_id,
                      device_key=keys.private_from_bytes(self.device_key),
                      device_key_id=self.device_key_id, gateway_public=self.gateway_public,
                      gateway_key_id=self.gateway_key_id, epoch=epoch)


class _Epochs:
    """Strictly increasing epochs in ms (like the agent), also across HostileDevice objects."""

    _last = 0
    _lock = threading.Lock()

    @classmethod
    def next(cls) -> int:
        with cls._lock:
            cls._last = max(cls._last + 1, time.time_ns() // 1_000_000)
            return cls._last


class HostileDevice:
    def __init__(self, bundle_dir: Path, identity: TLSIdentity, port: int, *, seed: int = 666) -> None:
        self.bundle_dir = bundle_dir
        self.bundle = Bundle.load(bundle_dir)
        self.device_id = self.bundle.device_id
        self.topic = topic_of(self.device_id)
        self.identity = identity
        self.port = port
        self._gen = Generator(seed=seed)
        self._seq = 0
        self._rcs: dict[int, int] = {}
        self._acked = threading.Condition()
        self.sealer = self.bundle.sealer(_Epochs.next())
        self.client = connect(identity, port)
        self.client.on_publish = self._on_publish

    # -- plumbing ------------------------------------------------------------------------------------
    def _on_publish(self, _c: mqtt.Client, _u: object, mid: int, rc: object, _p: object = None) -> None:
        with self._acked:
            self._rcs[mid] = int(getattr(rc, "value", rc))  # type: ignore[arg-type]
            self._acked.notify_all()

    def publish(self, payloads: Sequence[bytes], *, topic: str | None = None,
                timeout: float = 30.0) -> list[int]:
        """QoS 1 publish of every payload; returns the PUBACK reason codes (0 = accepted by the broker)."""
        mids = []
        for p in payloads:
            info = self.client.publish(topic or self.topic, p, qos=1)
            assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish failed locally: {info.rc}"
            mids.append(info.mid)
        deadline = time.monotonic() + timeout
        with self._acked:
            while not all(m in self._rcs for m in mids):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no PUBACK for {sum(m not in self._rcs for m in mids)} messages")
                self._acked.wait(left)
            return [self._rcs.pop(m) for m in mids]

    def plaintext(self) -> bytes:
        now = time.time_ns()
        window = codec.encode_window(
            self._gen.window("bearing"), kind="vibration", sample_rate_hz=self._gen.sample_rate_hz,
            start_ns=now - int(self._gen.window_len / self._gen.sample_rate_hz * 1e9),
            window_seq=self._seq, reason="anomaly", prefilter_version="hostile",
        )
        self._seq += 1
        return pb.Plaintext(sealed_at_ns=now, window=window).SerializeToString()

    def seal(self, n: int = 1, sealer: Sealer | None = None) -> list[bytes]:
        s = sealer or self.sealer
        return [s.seal(self.plaintext()) for _ in range(n)]

    def new_session(self, *, reload_bundle: bool = False) -> Sealer:
        """A new session (new ephemeral, higher epoch), as an agent restart makes. `reload_bundle` re-reads
        the keys from disk (after `sgw device rotate`)."""
        if reload_bundle:
            self.bundle = Bundle.load(self.bundle_dir)
        self.sealer = self.bundle.sealer(_Epochs.next())
        return self.sealer

    def valid(self, n: int = 1) -> list[bytes]:
        """Honest messages from this device (accepted by the gateway): the raw material of replays."""
        envs = self.seal(n)
        self.publish(envs)
        return envs

    # -- attacks -------------------------------------------------------------------------------------
    def foreign_topic(self, victim: str, n: int = 3) -> list[int]:
        return self.publish(self.seal(n), topic=topic_of(victim))

    def replay(self, envs: Sequence[bytes]) -> list[int]:
        return self.publish(list(envs))

    def bit_flipped(self, n: int = 5) -> list[int]:
        out = []
        for i, env in enumerate(self.seal(n)):
            b = bytearray(env)
            _header, ct = ev.split_envelope(env) or (b"", b"")
            pos = len(b) - 1 - (i * 7) % len(ct)  # somewhere in the ciphertext or tag
            b[pos] ^= 1 << (i % 8)
            out.append(bytes(b))
        return self.publish(out)

    def truncated(self, n: int = 5) -> list[int]:
        envs = self.seal(n)
        cuts = [len(e) // (i + 2) for i, e in enumerate(envs)]  # half, a third, ... and never whole
        return self.publish([e[:c] for e, c in zip(envs, cuts, strict=True)])

    def garbage(self, n: int = 5) -> list[int]:
        return self.publish([b"\xff" + os.urandom(10 + 37 * i) for i in range(n)])

    def oversized(self, n: int = 2) -> list[int]:
        head, _ = ev.split_envelope(self.seal(1)[0]) or (b"", b"")
        return self.publish([ev.encode_envelope(head, os.urandom(OVERSIZED_BYTES)) for _ in range(n)])

    def impersonate(self, victim: str, n: int = 3) -> list[int]:
        """Claims the victim's id in the header, sealed with its own key (it has no other)."""
        forger = self.bundle.sealer(_Epochs.next() + 10**9, device_id=victim)  # an epoch far ahead
        return self.publish(self.seal(n, forger))

    def stolen_key(self, victim_bundle: Path, n: int = 3) -> list[int]:
        """Genuine envelopes of the victim (its e2e key stolen, not its certificate) on our own topic."""
        victim = Bundle.load(victim_bundle).sealer(_Epochs.next())
        return self.publish(self.seal(n, victim))

    def old_session(self, withheld: Sequence[bytes]) -> list[int]:
        return self.publish(list(withheld))

    def flood(self, rate: float, seconds: float) -> tuple[int, list[int]]:
        """Valid windows at `rate` per second for `seconds`; returns (sent, PUBACK codes)."""
        n = int(rate * seconds)
        period = 1.0 / rate
        start = time.monotonic()
        mids = []
        for i in range(n):
            delay = start + i * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            info = self.client.publish(self.topic, self.sealer.seal(self.plaintext()), qos=1)
            assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
            mids.append(info.mid)
        deadline = time.monotonic() + 30
        with self._acked:
            while not all(m in self._rcs for m in mids) and time.monotonic() < deadline:
                self._acked.wait(0.5)
            return n, [self._rcs.pop(m, -1) for m in mids]

    def close(self) -> None:
        disconnect(self.client)
