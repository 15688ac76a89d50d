"""Crypto agility and suite 3 (X25519 + ML-KEM-768) in the sans-IO core: allow-list, per-device minimum,
the hybrid key schedule's bindings, bounds on the KEM ciphertext, one decapsulation per session."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.core import envelope as ev
from gateway.core import keys, suites
from gateway.core.reasons import Reason
from gateway.core.session import DeviceKeys, KeyEntry, Opened, Opener, Rejected, Sealer
from gateway.errors import ConfigError
from gateway.pb import envelope_pb2 as pb

NOW = 1_800_000_000_000_000_000
GW = keys.private_from_bytes(bytes(range(32)))
KEM = MLKEM768PrivateKey.from_seed_bytes(bytes(range(64)))
KEM_PUB = keys.kem_public_bytes(KEM)
DEV = keys.private_from_bytes(bytes(range(32, 64)))


def sealer(suite: int = suites.HYBRID, *, epoch: int = 1, kem_public: bytes = KEM_PUB, **kw: Any) -> Sealer:
    return Sealer(device_id="dev-1", device_key=DEV, device_key_id=1, gateway_public=keys.public_bytes(GW),
                  gateway_key_id=1, epoch=epoch, suite=suite,
                  gateway_kem_public=kem_public if suite == suites.HYBRID else None, **kw)


def registry(min_suite: int = suites.X25519) -> dict[str, DeviceKeys]:
    return {"dev-1": DeviceKeys("active", {1: KeyEntry(keys.public_bytes(DEV))}, min_suite)}


def opener(min_suite: int = suites.X25519, **kw: Any) -> Opener:
    kw.setdefault("gateway_kem_keys", {1: KEM})
    return Opener(gateway_keys={1: GW}, lookup=registry(min_suite).get, **kw)


def reason(result: Opened | Rejected) -> Reason | None:
    return None if isinstance(result, Opened) else result.reason


def with_header(raw: bytes, **fields: Any) -> bytes:
    env = pb.Envelope.FromString(raw)
    header = pb.Header.FromString(env.header)
    for name, value in fields.items():
        setattr(header, name, value)
    return ev.encode_envelope(header.SerializeToString(), env.ciphertext)


def test_hybrid_round_trip_and_header_is_protobufs_own_encoding() -> None:
    s = sealer()
    o = opener(suites.HYBRID)
    for i in range(3):
        raw = s.seal(b"hello %d" % i)
        got = o.open(raw, NOW, "dev-1")
        assert isinstance(got, Opened), got
        assert got.plaintext == b"hello %d" % i and got.header.suite == suites.HYBRID
        env = pb.Envelope.FromString(raw)
        header = pb.Header.FromString(env.header)
        assert env.header == header.SerializeToString()
        assert header.kem_ciphertext == s.kem_ciphertext and len(s.kem_ciphertext) == 1088
    # Every message carries the session's ciphertext: 1091 header bytes more than suite 1, and one more
    # byte for the envelope's header length (over 127 bytes).
    one = sealer(suites.X25519).seal(b"x")
    assert len(sealer().seal(b"x")) - len(one) == ev.KEM_FIELD_BYTES + 1


def test_messages_of_a_session_open_in_any_order_and_on_a_fresh_gateway() -> None:
    s = sealer()
    msgs = [s.seal(b"%d" % i) for i in range(4)]
    o = opener()
    for raw in reversed(msgs):  # no message depends on the first one arriving first
        assert isinstance(o.open(raw, NOW), Opened)
    # Another gateway instance (shared subscription) opens a middle message on its own.
    assert isinstance(opener().open(msgs[2], NOW), Opened)


def test_one_decapsulation_per_session() -> None:
    calls = []

    class Counting:
        def decapsulate(self, ct: bytes) -> bytes:
            calls.append(ct)
            return KEM.decapsulate(ct)

        def public_key(self) -> Any:
            return KEM.public_key()

    o = opener(gateway_kem_keys={1: Counting()})
    s = sealer()
    for i in range(5):
        assert isinstance(o.open(s.seal(b"%d" % i), NOW), Opened)
    assert len(calls) == 1
    s2 = sealer(epoch=2)
    assert isinstance(o.open(s2.seal(b"new"), NOW), Opened)
    assert len(calls) == 2


def test_allow_list_refuses_a_suite_the_fleet_does_not_serve() -> None:
    only_hybrid = opener(suites_allowed={suites.HYBRID})
    got = only_hybrid.open(sealer(suites.X25519).seal(b"x"), NOW, "dev-1")
    assert isinstance(got, Rejected) and got.reason is Reason.SUITE_NOT_ALLOWED and got.device_id == "dev-1"
    only_x = Opener(gateway_keys={1: GW}, lookup=registry().get)  # no KEM key: suite 1 only
    assert reason(only_x.open(sealer().seal(b"x"), NOW)) is Reason.SUITE_NOT_ALLOWED
    assert reason(only_x.open(sealer(suites.X25519).seal(b"x"), NOW)) is None
    # Unknown suites, and the downlink's 2, stay unsupported_version (an older gateway's answer too).
    raw = sealer(suites.X25519).seal(b"x")
    for bad in (0, 2, 4, 99):
        assert reason(opener().open(with_header(raw, suite=bad), NOW)) is Reason.UNSUPPORTED_VERSION


def test_a_device_registered_for_suite_3_cannot_be_downgraded() -> None:
    o = opener(suites.HYBRID)
    # Its own key, sealing suite 1 (a downgraded or misconfigured agent): refused before any crypto.
    got = o.open(sealer(suites.X25519).seal(b"x"), NOW, "dev-1")
    assert isinstance(got, Rejected) and got.reason is Reason.DOWNGRADE
    # The broker relabelling a hybrid message as suite 1 gets the same answer; stripped of its KEM
    # ciphertext too, still no crypto is spent on it.
    hybrid = sealer().seal(b"x")
    assert reason(o.open(with_header(hybrid, suite=1, kem_ciphertext=b""), NOW)) is Reason.DOWNGRADE
    assert not o._windows  # nothing refused moved state
    assert isinstance(o.open(hybrid, NOW), Opened)
    # A device at the default minimum may use either suite.
    o1 = opener(suites.X25519)
    assert isinstance(o1.open(sealer(suites.X25519).seal(b"x"), NOW), Opened)
    assert isinstance(o1.open(sealer(epoch=2).seal(b"y"), NOW), Opened)


def test_unknown_minimum_refuses_everything() -> None:
    assert suites.below(suites.HYBRID, 99) and suites.below(suites.X25519, 99)
    assert reason(opener(99).open(sealer().seal(b"x"), NOW)) is Reason.DOWNGRADE


def test_kem_ciphertext_bounds() -> None:
    s = sealer()
    raw = s.seal(b"x")
    o = opener()
    assert reason(o.open(with_header(raw, kem_ciphertext=b""), NOW)) is Reason.MALFORMED
    assert reason(o.open(with_header(raw, kem_ciphertext=s.kem_ciphertext[:-1]), NOW)) is Reason.MALFORMED
    assert reason(o.open(with_header(raw, kem_ciphertext=s.kem_ciphertext + b"\0"), NOW)) is Reason.MALFORMED
    # A suite-1 header carrying a KEM field, or over suite 1's 256 bytes, is malformed as before.
    one = sealer(suites.X25519).seal(b"x")
    assert reason(o.open(with_header(one, kem_ciphertext=b"k" * 1088), NOW)) is Reason.MALFORMED
    assert reason(o.open(with_header(one, device_id="d" * 64, ephemeral=b"e" * 200), NOW)) is Reason.MALFORMED
    # The header is bounded before it is parsed: past the hybrid bound the envelope is refused whole.
    big = pb.Header(version=1, suite=3, device_id="dev-1", ephemeral=b"e" * 32, kem_ciphertext=b"k" * 1400)
    assert len(big.SerializeToString()) > ev.MAX_HYBRID_HEADER_BYTES
    assert ev.split_envelope(ev.encode_envelope(big.SerializeToString(), b"t" * 16),
                             ev.MAX_HYBRID_HEADER_BYTES) is None
    assert reason(o.open(ev.encode_envelope(big.SerializeToString(), b"t" * 16), NOW)) is Reason.MALFORMED


def test_every_bound_input_is_authenticated() -> None:
    s = sealer()
    raw = s.seal(b"x")
    o = opener()
    flipped = bytearray(s.kem_ciphertext)
    flipped[100] ^= 1
    # A changed ciphertext decapsulates to another secret (implicit rejection): bad_auth, no state.
    assert reason(o.open(with_header(raw, kem_ciphertext=bytes(flipped)), NOW)) is Reason.BAD_AUTH
    # Sealed to another ML-KEM key: the gateway's decapsulation gives another secret.
    other = keys.kem_public_bytes(MLKEM768PrivateKey.from_seed_bytes(bytes(64)))
    assert reason(o.open(sealer(kem_public=other).seal(b"x"), NOW)) is Reason.BAD_AUTH
    # A gateway with no ML-KEM key under the header's key id.
    o2 = Opener(gateway_keys={1: GW, 2: GW}, lookup=registry().get, gateway_kem_keys={2: KEM})
    assert reason(o2.open(raw, NOW)) is Reason.BAD_AUTH
    assert not o._windows and not o2._windows
    assert isinstance(o.open(raw, NOW), Opened)


def test_the_kem_secret_and_both_public_keys_are_in_the_key() -> None:
    eph = keys.private_from_bytes(bytes(range(64, 96)))
    shared, ct = KEM.public_key().encapsulate()
    base = sealer(ephemeral=eph, kem_encapsulation=(shared, ct)).seal(b"x")
    assert isinstance(opener().open(base, NOW), Opened)
    # Same X25519 inputs, another KEM secret under the same ciphertext: a different key.
    wrong = sealer(ephemeral=eph, kem_encapsulation=(bytes(32), ct)).seal(b"x")
    assert reason(opener().open(wrong, NOW)) is Reason.BAD_AUTH
    # A suite-1 key with the same ephemeral never equals the hybrid one (separate labels and inputs).
    one = sealer(suites.X25519, ephemeral=eph).seal(b"x")
    assert pb.Envelope.FromString(one).ciphertext != pb.Envelope.FromString(base).ciphertext


def test_configuration_errors() -> None:
    with pytest.raises(ConfigError):
        Opener(gateway_keys={1: GW}, lookup=registry().get, suites_allowed={suites.HYBRID})  # no KEM key
    with pytest.raises(ConfigError):
        Opener(gateway_keys={1: GW}, lookup=registry().get, suites_allowed=set())
    with pytest.raises(ConfigError):
        Opener(gateway_keys={1: GW}, lookup=registry().get, suites_allowed={2})
    with pytest.raises(ConfigError):
        Opener(gateway_keys={1: GW}, lookup=registry().get, gateway_kem_keys={5: KEM})
    with pytest.raises(ConfigError):
        sealer(kem_public=b"short")
    with pytest.raises(ConfigError):
        sealer(suites.DOWNLINK)
    with pytest.raises(ConfigError):
        Sealer(device_id="dev-1", device_key=DEV, device_key_id=1, gateway_public=keys.public_bytes(GW),
               gateway_key_id=1, epoch=1, suite=suites.HYBRID)  # no KEM public key
    with pytest.raises(ConfigError):
        sealer(suites.X25519, kem_encapsulation=(bytes(32), bytes(1088)))
    with pytest.raises(ConfigError):
        suites.number("kyber", "e2e.suite")
    assert suites.numbers(["x25519", "x25519-mlkem768"], "k") == suites.UPLINK


HYBRID_SEALER = sealer(epoch=4, ephemeral=keys.private_from_bytes(bytes(range(64, 96))))
HYBRID_GENUINE = [HYBRID_SEALER.seal(bytes([i]) * (i * 37 % 700)) for i in range(4)]
hybrid_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 7)),
    st.tuples(st.just("cut"), st.integers(0, 10_000), st.integers(1, 1200)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000)),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(HYBRID_GENUINE) - 1), st.lists(hybrid_mutation, min_size=1, max_size=3),
       st.booleans(), st.sampled_from([suites.X25519, suites.HYBRID]))
def test_mutated_hybrid_envelopes_never_raise_and_never_open(which: int, ops: list[tuple[Any, ...]],
                                                             warm: bool, floor: int) -> None:
    o = opener(floor)
    if warm:  # with the session cached (its decapsulation done) and a live replay window
        assert isinstance(o.open(HYBRID_GENUINE[0], NOW), Opened)
    b = bytearray(HYBRID_GENUINE[which])
    for kind, at, *arg in ops:
        i = int(at) % (len(b) + 1)
        if kind == "flip" and i < len(b):
            b[i] ^= 1 << int(arg[0])
        elif kind == "cut":
            del b[i:i + int(arg[0])]
        elif kind == "insert":
            b[i:i] = arg[0]
        elif kind == "truncate":
            del b[i:]
    got = o.open(bytes(b), NOW)
    assert isinstance(got, Opened | Rejected)
    if isinstance(got, Opened):
        assert bytes(b) in HYBRID_GENUINE
