"""Fuzzing Opener.open: random, mutated and structurally valid-looking envelopes never raise,
and nothing but the genuine bytes is ever accepted."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.core import envelope as ev
from gateway.core import keys
from gateway.core.reasons import Reason
from gateway.core.session import DeviceKeys, KeyEntry, Opened, Opener, Rejected, Sealer
from gateway.pb import envelope_pb2 as pb

NOW = 1_800_000_000_000_000_000
GW = keys.private_from_bytes(bytes(range(32)))
DEV = keys.private_from_bytes(bytes(range(32, 64)))
REGISTRY = {"dev-1": DeviceKeys("active", {1: KeyEntry(keys.public_bytes(DEV)), 2: KeyEntry(bytes(32))})}
SEALER = Sealer(device_id="dev-1", device_key=DEV, device_key_id=1, gateway_public=keys.public_bytes(GW),
                gateway_key_id=1, epoch=4, ephemeral=keys.private_from_bytes(bytes(range(64, 96))))
GENUINE = [SEALER.seal(bytes([i]) * (i * 37 % 700)) for i in range(8)]
FUZZ = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def opener() -> Opener:
    return Opener(gateway_keys={1: GW, 2: GW}, lookup=REGISTRY.get, max_message_bytes=2048)


def check(o: Opener, raw: bytes) -> None:
    got = o.open(raw, NOW)  # an exception escaping here fails the test
    assert isinstance(got, Opened | Rejected)
    if isinstance(got, Opened):
        assert raw in GENUINE, "a non-genuine byte string was accepted"
    else:
        assert isinstance(got.reason, Reason)


@FUZZ
@given(st.binary(max_size=3000))
def test_random_bytes(raw: bytes) -> None:
    check(opener(), raw)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10_000), st.integers(1, 64)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000)),
    st.tuples(st.just("splice"), st.integers(0, 7), st.integers(0, 10_000)),
)


def mutate(raw: bytes, ops: list[tuple[Any, ...]]) -> bytes:
    b = bytearray(raw)
    for op in ops:
        kind = op[0]
        i = int(op[1]) % (len(b) + 1)
        if kind == "flip" and i < len(b):
            b[i] ^= 1 << int(op[2])
        elif kind == "set" and i < len(b):
            b[i] = int(op[2])
        elif kind == "cut":
            del b[i:i + int(op[2])]
        elif kind == "insert":
            b[i:i] = op[2]
        elif kind == "truncate":
            del b[i:]
        elif kind == "splice":  # head of this message, tail of another
            other = GENUINE[int(op[1]) % len(GENUINE)]
            cut = int(op[2]) % (len(other) + 1)
            b = b[:cut] + other[cut:]
    return bytes(b)


@FUZZ
@given(st.integers(0, len(GENUINE) - 1), st.lists(mutation, min_size=1, max_size=4), st.booleans())
def test_mutated_envelopes(which: int, ops: list[tuple[Any, ...]], warm: bool) -> None:
    o = opener()
    if warm:  # with a cached session and a live replay window, too
        assert isinstance(o.open(GENUINE[0], NOW), Opened)
    check(o, mutate(GENUINE[which], ops))


headers = st.builds(
    pb.Header,
    version=st.sampled_from([0, 1, 1, 1, 2, (1 << 32) - 1]),
    suite=st.sampled_from([0, 1, 1, 1, 2, 3]),
    device_id=st.sampled_from(["dev-1", "dev-1", "dev-2", "", "x" * 65, "é", "a/b"]) | st.text(max_size=70),
    epoch=st.sampled_from([0, 3, 4, 5, (1 << 64) - 1]) | st.integers(0, (1 << 64) - 1),
    counter=st.sampled_from([0, 1, 2, (1 << 64) - 1]) | st.integers(0, (1 << 64) - 1),
    ephemeral=st.sampled_from([SEALER.ephemeral_public, bytes(32), b"\x01" + bytes(31)])
    | st.binary(max_size=40),
    device_key_id=st.sampled_from([0, 1, 2, 3]),
    gateway_key_id=st.sampled_from([0, 1, 2, 3]),
)


@FUZZ
@given(headers, st.binary(max_size=200), st.booleans(), st.binary(max_size=8))
def test_structured_envelopes(header: pb.Header, ciphertext: bytes, canonical: bool, extra: bytes) -> None:
    hbytes = header.SerializeToString()
    if canonical:
        raw = ev.encode_envelope(hbytes, ciphertext)
    else:  # protobuf's own encoding, with unknown trailing fields
        raw = pb.Envelope(header=hbytes, ciphertext=ciphertext).SerializeToString() + b"\x1a" + bytes(
            [len(extra)]) + extra
    check(opener(), raw)


def test_an_unexpected_failure_inside_open_is_a_rejection_not_an_exception() -> None:
    def broken_lookup(device_id: str) -> DeviceKeys | None:
        raise RuntimeError("registry bug")

    o = Opener(gateway_keys={1: GW}, lookup=broken_lookup)
    assert o.open(GENUINE[0], NOW) == Rejected(Reason.MALFORMED, None)
