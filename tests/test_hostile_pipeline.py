"""Hostile inputs at the pure pipeline (no broker): what a device with a valid certificate can do to
*another* device's state through its own topic. Real Sealer/Opener/TokenBuckets, no clocks or sockets.
"""

from __future__ import annotations

import numpy as np

from gateway.core import keys
from gateway.core.codec import encode_window
from gateway.core.pipeline import Accepted, Pipeline, Rejected, Route
from gateway.core.ratelimit import TokenBuckets
from gateway.core.reasons import Reason
from gateway.core.session import DeviceKeys, KeyEntry, Opener, Sealer
from gateway.core.topics import topic_for
from gateway.pb import messages_pb2 as pb

NOW = 1_800_000_000_000_000_000
EPOCH = NOW // 1_000_000  # an agent's epoch: milliseconds
GW = keys.generate()
HONEST, ATTACKER = "dev-honest", "dev-attacker"
DEVICE_KEYS = {d: keys.generate() for d in (HONEST, ATTACKER)}
REGISTRY = {d: DeviceKeys("active", {1: KeyEntry(keys.public_bytes(k))}) for d, k in DEVICE_KEYS.items()}


def sealer(device_id: str, epoch: int, *, key_of: str | None = None) -> Sealer:
    return Sealer(device_id=device_id, device_key=DEVICE_KEYS[key_of or device_id], device_key_id=1,
                  gateway_public=keys.public_bytes(GW), gateway_key_id=1, epoch=epoch)


def plaintext(seq: int) -> bytes:
    w = encode_window(np.zeros((128, 3), np.float32), kind="vibration", sample_rate_hz=1600.0,
                      start_ns=NOW - 10**8, window_seq=seq)
    return pb.Plaintext(sealed_at_ns=NOW, window=w).SerializeToString()


def pipeline() -> Pipeline:
    return Pipeline(opener=Opener(gateway_keys={1: GW}, lookup=REGISTRY.get),
                    limiter=TokenBuckets(200.0, 400, 1000),
                    routes={"vibration": Route("classifier", (128, 3))}, max_batch=64)


def outcome(events: list[object]) -> str:
    for e in events:
        if isinstance(e, Rejected):
            return str(e.reason)
    assert any(isinstance(e, Accepted) for e in events), events
    return "accepted"


def test_stolen_e2e_key_on_own_topic_is_topic_mismatch() -> None:
    p = pipeline()
    honest = sealer(HONEST, EPOCH)
    assert outcome(p.feed(topic_for(HONEST), honest.seal(plaintext(0)), NOW)) == "accepted"
    stolen = sealer(HONEST, EPOCH + 1, key_of=HONEST)  # the attacker has the honest device's e2e key...
    # ...but only its own certificate, so only its own topic.
    assert outcome(p.feed(topic_for(ATTACKER), stolen.seal(plaintext(0)), NOW)) == Reason.TOPIC_MISMATCH
    assert p.rejections[Reason.TOPIC_MISMATCH] == 1


def test_rejected_topic_mismatch_does_not_move_the_victims_replay_state() -> None:
    p = pipeline()
    honest = sealer(HONEST, EPOCH)
    assert outcome(p.feed(topic_for(HONEST), honest.seal(plaintext(0)), NOW)) == "accepted"
    far = sealer(HONEST, 2**63, key_of=HONEST)
    assert outcome(p.feed(topic_for(ATTACKER), far.seal(plaintext(1)), NOW)) == Reason.TOPIC_MISMATCH
    # The honest device carries on in its own session: nothing it sends may be refused now.
    assert outcome(p.feed(topic_for(HONEST), honest.seal(plaintext(1)), NOW)) == "accepted"


def test_impersonation_with_own_key_moves_nothing() -> None:
    """The header names the victim, the attacker seals with its own key on its own topic: refused as
    topic_mismatch before any key work, and the victim's next message is still accepted."""
    p = pipeline()
    honest = sealer(HONEST, EPOCH)
    assert outcome(p.feed(topic_for(HONEST), honest.seal(plaintext(0)), NOW)) == "accepted"
    forged = sealer(HONEST, 2**63, key_of=ATTACKER)
    for i in range(50):
        assert outcome(p.feed(topic_for(ATTACKER), forged.seal(plaintext(i)), NOW)) == Reason.TOPIC_MISMATCH
    assert outcome(p.feed(topic_for(HONEST), honest.seal(plaintext(1)), NOW)) == "accepted"


def test_a_flood_on_one_topic_never_rate_limits_another_device() -> None:
    p = pipeline()
    attacker = sealer(ATTACKER, EPOCH)
    honest = sealer(HONEST, EPOCH)
    outcomes: dict[str, int] = {}
    for i in range(4000):  # 4000 messages inside one second of pipeline time: 10x the 400 burst
        now = NOW + i * 250_000
        o = outcome(p.feed(topic_for(ATTACKER), attacker.seal(plaintext(i)), now))
        outcomes[o] = outcomes.get(o, 0) + 1
        if i % 20 == 0:
            assert outcome(p.feed(topic_for(HONEST), honest.seal(plaintext(i)), now)) == "accepted"
        p.release(p.queued)  # the test is not about the queue
        p.flush()
    assert outcomes[Reason.RATE_LIMITED] > 3000, outcomes
