"""The network-thread shell's crash semantics, deterministically, with a fake paho client (no sockets).

The SIGKILL test in test_gateway_service.py kills at a random moment; this one stops the process at the
worst one, between the batch's SQLite commit and its publish, and checks what the restarted gateway does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from paho.mqtt.enums import MQTTErrorCode

from gateway.core import keys
from gateway.core.codec import encode_window
from gateway.core.pipeline import Pipeline, Route
from gateway.core.ratelimit import TokenBuckets
from gateway.core.session import Opener, Sealer
from gateway.core.topics import RESULTS_TOPIC, topic_for
from gateway.pb import messages_pb2 as pb
from gateway.registry.store import Registry
from gateway.server.metrics import GatewayStats
from gateway.server.shell import MqttShell, ShellOptions
from gateway.server.store import ResultStore

NOW = 1_800_000_000_000_000_000


class Crash(BaseException):
    """The process dies here (SIGKILL): nothing after this point runs."""


@dataclass
class FakeClient:
    crash_on_publish: bool = False
    published: list[tuple[int, bytes]] = field(default_factory=list)
    acks: list[int] = field(default_factory=list)
    next_mid: int = 100

    def manual_ack_set(self, on: bool) -> None: ...
    def max_inflight_messages_set(self, n: int) -> None: ...
    def socket(self) -> None:
        return None

    def subscribe(self, *a: Any, **kw: Any) -> tuple[MQTTErrorCode, int]:
        return MQTTErrorCode.MQTT_ERR_SUCCESS, 1

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> Any:
        if self.crash_on_publish:
            raise Crash
        if qos == 0:  # paho numbers QoS 0 from the same 16-bit counter; here: reuse the last result's mid
            return SimpleNamespace(rc=MQTTErrorCode.MQTT_ERR_SUCCESS, mid=self.next_mid)
        assert topic == RESULTS_TOPIC
        self.next_mid += 1
        self.published.append((self.next_mid, payload))
        return SimpleNamespace(rc=MQTTErrorCode.MQTT_ERR_SUCCESS, mid=self.next_mid)

    def ack(self, mid: int, qos: int) -> MQTTErrorCode:
        self.acks.append(mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS


class FakeModel:
    name = "classifier"
    version = "test"
    labels = ("healthy", "bearing")
    backend = "cpu"

    def predict(self, x: npt.ArrayLike) -> npt.NDArray[np.float32]:
        a = np.asarray(x)
        return np.stack([a.mean(axis=(1, 2)), -a.mean(axis=(1, 2))], axis=1).astype(np.float32)


@pytest.fixture
def world(tmp_path: Path) -> SimpleNamespace:
    gateway_key, device_key = keys.generate(), keys.generate()
    db = tmp_path / "registry.db"
    with Registry.open(db, create=True) as reg:
        reg.add_device("dev-a", "vibration", keys.public_bytes(device_key), "s1", NOW * 2)
    sealer = Sealer(device_id="dev-a", device_key=device_key, device_key_id=1,
                    gateway_public=keys.public_bytes(gateway_key), gateway_key_id=1, epoch=7)
    return SimpleNamespace(db=db, gateway_key=gateway_key, sealer=sealer)


def start_gateway(world: SimpleNamespace, client: FakeClient, *, max_unconfirmed: int = 1024) -> MqttShell:
    """What service.build() does at start: registry snapshot and stored replay windows into the Opener."""
    with Registry.open(world.db) as reg:
        devices, stored = reg.snapshot(), reg.load_replay()
    opener = Opener(gateway_keys={1: world.gateway_key}, lookup=devices.get)
    for device_id, state in stored.items():
        opener.load_replay_state(device_id, state)
    pipeline = Pipeline(opener=opener, limiter=TokenBuckets(1e6, 1e6, 10),
                        routes={"vibration": Route("classifier", (128, 3))}, max_batch=4)
    opts = ShellOptions(gateway_id="gw-1", host="h", port=1, share_group="sgw", session_expiry_s=60,
                        receive_maximum=16, keepalive_s=30, results_json=False, deadletter=False)
    shell = MqttShell(client=client, options=opts, pipeline=pipeline,  # type: ignore[arg-type]
                      models={"classifier": FakeModel()}, store=ResultStore(world.db, "gw-1"),
                      stats=GatewayStats(), max_unconfirmed=max_unconfirmed)
    ok = SimpleNamespace(is_failure=False)
    shell._on_connect(client, None, SimpleNamespace(session_present=True), ok, None)  # type: ignore[arg-type]
    return shell


def sealed_windows(world: SimpleNamespace, n: int, start_seq: int) -> list[bytes]:
    rng = np.random.default_rng(start_seq)
    out = []
    for i in range(n):
        w = encode_window(rng.normal(size=(128, 3)).astype(np.float32), kind="vibration",
                          sample_rate_hz=1600.0, start_ns=NOW, window_seq=start_seq + i)
        plain = pb.Plaintext(sealed_at_ns=time.time_ns(), window=w)  # the shell checks skew on its clock
        out.append(world.sealer.seal(plain.SerializeToString()))
    return out


def deliver(shell: MqttShell, raw: list[bytes], first_mid: int) -> None:
    for i, payload in enumerate(raw):
        msg = SimpleNamespace(topic=topic_for("dev-a"), payload=payload, mid=first_mid + i, qos=1,
                              retain=False)
        shell._on_message(None, None, msg)  # type: ignore[arg-type]


def results(client: FakeClient) -> list[tuple[tuple[str, int, int], bytes]]:
    return [((r.device_id, r.epoch, r.counter), r.SerializeToString())
            for _mid, payload in client.published for r in pb.ResultBatch.FromString(payload).results]


def test_kill_between_commit_and_publish_gives_exactly_one_result(world: SimpleNamespace) -> None:
    first = sealed_windows(world, 4, 0)
    a = FakeClient(crash_on_publish=True)
    shell_a = start_gateway(world, a)
    with pytest.raises(Crash):
        deliver(shell_a, first, first_mid=1)  # the 4th message fills the batch: commit, then death
    assert a.acks == [] and a.published == []  # nothing left the process

    b = FakeClient()
    shell_b = start_gateway(world, b)  # restart: republishes the committed batch at CONNACK
    assert len(results(b)) == 4
    deliver(shell_b, first, first_mid=1)  # the broker redelivers the 4 unacked inputs
    assert b.acks == [1, 2, 3, 4]  # each rejected as a replay (its result is already out) and acked
    assert shell_b._pipeline.rejections["replay"] == 4  # type: ignore[index]
    more = sealed_windows(world, 4, 4)
    deliver(shell_b, more, first_mid=5)
    assert b.acks == [1, 2, 3, 4, 5, 6, 7, 8]  # acked once stored and handed to paho

    keys_seen = [k for k, _ in results(b)]
    assert sorted(keys_seen) == [("dev-a", 7, c) for c in range(8)]  # exactly one result per window
    for mid, _ in b.published:  # PUBACKs for the results
        shell_b._on_publish(b, None, mid, SimpleNamespace(is_failure=False), None)  # type: ignore[arg-type]
    shell_b._store.purge()
    assert shell_b._store.pending() == []
    assert shell_b._pipeline.queued == 0


def test_a_qos0_mid_that_wraps_onto_a_waiting_result_does_not_confirm_it(world: SimpleNamespace) -> None:
    b = FakeClient()
    shell = start_gateway(world, b)
    deliver(shell, sealed_windows(world, 4, 0), first_mid=1)
    (mid, _payload), = b.published
    assert mid in shell._flow.awaiting
    shell._publish_qos0("sgw/v1/deadletter", b"x")  # gets the same mid from the fake client
    ok = SimpleNamespace(is_failure=False)
    shell._on_publish(b, None, mid, ok, None)  # type: ignore[arg-type]  # the QoS 0 write completing
    assert mid in shell._flow.awaiting  # the result is still unconfirmed: its pending row must stay
    shell._on_publish(b, None, mid, ok, None)  # type: ignore[arg-type]  # the real PUBACK
    assert mid not in shell._flow.awaiting


def test_unconfirmed_results_wait_in_the_store_and_inputs_are_still_acked(world: SimpleNamespace) -> None:
    """The broker confirms nothing (its PUBACKs are behind a backlog): no input waits, no queue slot is
    held, nothing is dropped as `overloaded`; result batches past MAX_UNCONFIRMED stay on disk and go out,
    oldest first, as PUBACKs make room."""
    b = FakeClient()
    shell = start_gateway(world, b, max_unconfirmed=2)
    deliver(shell, sealed_windows(world, 20, 0), first_mid=1)  # 5 batches of 4
    assert b.acks == list(range(1, 21))  # every input acked once its result was stored
    assert shell._pipeline.queued == 0 and shell._pipeline.rejections["overloaded"] == 0  # type: ignore[index]
    assert len(b.published) == 2 and list(shell._flow.deferred) and shell._stats.deferred_results == 3
    assert len(shell._store.pending()) == 5
    ok = SimpleNamespace(is_failure=False)
    while shell._flow.awaiting or shell._flow.deferred:
        for mid in list(shell._flow.awaiting):
            shell._on_publish(b, None, mid, ok, None)  # type: ignore[arg-type]
        shell._publish_deferred()  # what the loop does after each read
    assert len(b.published) == 5 and shell._stats.deferred_results == 0
    assert sorted(k for k, _ in results(b)) == [("dev-a", 7, c) for c in range(20)]
    shell._store.purge()
    assert shell._store.pending() == []
