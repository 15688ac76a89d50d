"""Sealer/Opener: round trip, tamper evidence, registry decisions, key rotation, bounded caches."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core import envelope as ev
from gateway.core import keys
from gateway.core.reasons import Reason
from gateway.core.session import DeviceKeys, KeyEntry, Opened, Opener, Rejected, Sealer
from gateway.errors import ConfigError
from gateway.pb import envelope_pb2 as pb

NOW = 1_800_000_000_000_000_000
GW = keys.private_from_bytes(bytes(range(32)))
DEV = keys.private_from_bytes(bytes(range(32, 64)))
device_ids = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)
u64 = st.integers(0, (1 << 64) - 1)
u32 = st.integers(0, (1 << 32) - 1)


def sealer(device_id: str = "dev-1", *, epoch: int = 1, key: X25519PrivateKey = DEV, key_id: int = 1,
           gateway: X25519PrivateKey = GW, gateway_key_id: int = 1, first_counter: int = 0,
           ephemeral: X25519PrivateKey | None = None) -> Sealer:
    return Sealer(device_id=device_id, device_key=key, device_key_id=key_id,
                  gateway_public=keys.public_bytes(gateway), gateway_key_id=gateway_key_id, epoch=epoch,
                  ephemeral=ephemeral, first_counter=first_counter)


def opener(registry: dict[str, DeviceKeys] | None = None, **kw: object) -> Opener:
    reg = registry if registry is not None else {"dev-1": active({1: DEV})}
    return Opener(gateway_keys={1: GW}, lookup=reg.get, **kw)  # type: ignore[arg-type]


def active(device_keys: dict[int, X25519PrivateKey], not_after: dict[int, int] | None = None) -> DeviceKeys:
    ends = not_after or {}
    entries = {k: KeyEntry(keys.public_bytes(v), ends.get(k)) for k, v in device_keys.items()}
    return DeviceKeys("active", entries)


def reason(result: Opened | Rejected) -> Reason | None:
    return None if isinstance(result, Opened) else result.reason


@settings(max_examples=60, deadline=None)
@given(device_id=device_ids, epoch=u64, counter=u64, dk=u32, gk=u32, plaintext=st.binary(max_size=2048))
def test_round_trip(device_id: str, epoch: int, counter: int, dk: int, gk: int, plaintext: bytes) -> None:
    s = sealer(device_id, epoch=epoch, key_id=dk, gateway_key_id=gk, first_counter=counter)
    o = Opener(gateway_keys={gk: GW}, lookup={device_id: active({dk: DEV})}.get)
    raw = s.seal(plaintext)
    got = o.open(raw, NOW)
    assert isinstance(got, Opened), got
    assert (got.device_id, got.epoch, got.counter, got.plaintext) == (device_id, epoch, counter, plaintext)
    assert got.header.device_key_id == dk and got.header.gateway_key_id == gk
    assert s.next_counter == counter + 1
    # The hand-built bytes are exactly what protobuf itself would serialize.
    env = pb.Envelope.FromString(raw)
    assert env.SerializeToString() == raw
    assert pb.Header.FromString(env.header).SerializeToString() == env.header


def test_every_single_bit_flip_is_rejected_and_ciphertext_flips_are_bad_auth() -> None:
    o = opener()
    raw = sealer(first_counter=5).seal(b"telemetry" * 4)
    parts = ev.split_envelope(raw)
    assert parts is not None
    ct_start = len(raw) - len(parts[1])
    for bit in range(len(raw) * 8):
        mutated = bytearray(raw)
        mutated[bit // 8] ^= 1 << (bit % 8)
        got = o.open(bytes(mutated), NOW)
        assert isinstance(got, Rejected), f"bit {bit} accepted"
        if bit // 8 >= ct_start:
            assert got.reason is Reason.BAD_AUTH, (bit, got)
    # None of the forgeries moved any state: the genuine message still opens, once.
    assert isinstance(o.open(raw, NOW), Opened)
    assert reason(o.open(raw, NOW)) is Reason.REPLAY


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_header_field_tampering_never_authenticates(data: st.DataObject) -> None:
    raw = sealer(first_counter=3).seal(b"x")
    env = pb.Envelope.FromString(raw)
    header = pb.Header.FromString(env.header)
    field = data.draw(st.sampled_from(["epoch", "counter", "device_key_id", "gateway_key_id", "ephemeral"]))
    if field == "ephemeral":
        value: object = keys.public_bytes(keys.generate())
    else:
        value = data.draw(u32.filter(lambda v: v != getattr(header, field)))
    setattr(header, field, value)
    reg = {"dev-1": active({1: DEV, header.device_key_id: DEV})}
    o = Opener(gateway_keys={1: GW, header.gateway_key_id: GW}, lookup=reg.get)
    got = o.open(ev.encode_envelope(header.SerializeToString(), env.ciphertext), NOW)
    assert reason(got) is Reason.BAD_AUTH


def test_sealed_to_another_gateway_is_bad_auth() -> None:
    raw = sealer(gateway=keys.generate()).seal(b"x")
    assert reason(opener().open(raw, NOW)) is Reason.BAD_AUTH


def test_device_key_not_registered_for_that_device_is_bad_auth() -> None:
    raw = sealer(key=keys.generate()).seal(b"x")
    assert reason(opener().open(raw, NOW)) is Reason.BAD_AUTH


def test_size_and_shape_rejections() -> None:
    o = opener(max_message_bytes=1024)
    good = sealer().seal(b"x")
    assert reason(o.open(sealer().seal(b"x" * 1000), NOW)) is Reason.TOO_LARGE
    assert reason(o.open(b"", NOW)) is Reason.MALFORMED
    assert reason(o.open(b"\xff" * 40, NOW)) is Reason.MALFORMED
    assert reason(o.open(good + b"\x00", NOW)) is Reason.MALFORMED  # nothing may follow the ciphertext
    hdr = pb.Header.FromString(pb.Envelope.FromString(good).header)
    big = pb.Header(version=1, suite=1, device_id="dev-1", ephemeral=bytes(32 + 300))
    assert len(big.SerializeToString()) > ev.MAX_HEADER_BYTES
    assert reason(o.open(ev.encode_envelope(big.SerializeToString(), bytes(16)), NOW)) is Reason.MALFORMED
    for field, value, expected in [
        ("version", 2, Reason.UNSUPPORTED_VERSION), ("suite", 0, Reason.UNSUPPORTED_VERSION),
        ("device_id", "bad/id", Reason.MALFORMED), ("device_id", "", Reason.MALFORMED),
        ("device_id", "d" * 65, Reason.MALFORMED), ("device_id", "dév", Reason.MALFORMED),
        ("ephemeral", bytes(31), Reason.MALFORMED),
    ]:
        h = pb.Header()
        h.CopyFrom(hdr)
        setattr(h, field, value)
        got = o.open(ev.encode_envelope(h.SerializeToString(), bytes(32)), NOW)
        assert reason(got) is expected, (field, value, got)
    # The claimed id is reported only when it is well formed (it ends up in logs and dead letters).
    h = pb.Header(version=9, device_id="a b")
    assert o.open(ev.encode_envelope(h.SerializeToString(), bytes(16)), NOW) == Rejected(
        Reason.UNSUPPORTED_VERSION, None)


def test_low_order_ephemeral_is_bad_auth_not_an_exception() -> None:
    raw = sealer().seal(b"x")
    env = pb.Envelope.FromString(raw)
    h = pb.Header.FromString(env.header)
    for point in (bytes(32), b"\x01" + bytes(31)):
        h.ephemeral = point
        assert reason(opener().open(ev.encode_envelope(h.SerializeToString(), env.ciphertext), NOW)) is (
            Reason.BAD_AUTH)


def test_unknown_and_revoked_devices() -> None:
    raw = sealer().seal(b"x")
    assert opener({}).open(raw, NOW) == Rejected(Reason.UNKNOWN_DEVICE, "dev-1")
    revoked = {"dev-1": DeviceKeys("revoked", active({1: DEV}).keys)}
    assert opener(revoked).open(raw, NOW) == Rejected(Reason.REVOKED, "dev-1")
    # Revocation takes effect on the next message, even with a cached session.
    reg = {"dev-1": active({1: DEV})}
    o = opener(reg)
    s = sealer()
    assert isinstance(o.open(s.seal(b"a"), NOW), Opened)
    reg["dev-1"] = revoked["dev-1"]
    assert reason(o.open(s.seal(b"b"), NOW)) is Reason.REVOKED


def test_rotation_grace_then_old_key_refused() -> None:
    new = keys.generate()
    grace_end = NOW + 1000
    reg = {"dev-1": active({1: DEV, 2: new}, not_after={1: grace_end})}
    o = opener(reg)
    old_s = sealer(epoch=1, key=DEV, key_id=1)
    assert isinstance(o.open(old_s.seal(b"a"), NOW), Opened)        # old key inside its grace period
    assert reason(o.open(old_s.seal(b"b"), grace_end + 1)) is Reason.BAD_AUTH  # grace over
    new_s = sealer(epoch=2, key=new, key_id=2)
    assert isinstance(o.open(new_s.seal(b"c"), NOW), Opened)
    # Once the new key authenticated, the old one is refused even inside the grace period ...
    assert reason(o.open(sealer(epoch=3, key=DEV, key_id=1).seal(b"d"), NOW)) is Reason.BAD_AUTH
    # ... and that survives a restart through the persisted replay state.
    state = o._windows["dev-1"].to_bytes()  # what the gateway's store persists for it
    restarted = opener(reg)
    restarted.load_replay_state("dev-1", state)
    assert reason(restarted.open(sealer(epoch=4, key=DEV, key_id=1).seal(b"e"), NOW)) is Reason.BAD_AUTH
    assert isinstance(restarted.open(sealer(epoch=4, key=new, key_id=2).seal(b"f"), NOW), Opened)


def test_a_device_on_its_new_key_is_reported_once_for_retiring_the_old_one() -> None:
    new = keys.generate()
    reg = {"dev-1": active({1: DEV, 2: new}, not_after={1: NOW + 1000}), "dev-2": active({1: DEV})}
    o = opener(reg)
    assert isinstance(o.open(sealer(key=DEV, key_id=1).seal(b"a"), NOW), Opened)  # the old key: nothing
    assert isinstance(o.open(sealer("dev-2").seal(b"a"), NOW), Opened)  # never rotated: nothing
    assert o.take_rotated() == []
    new_s = sealer(epoch=2, key=new, key_id=2)
    for i in range(3):  # one report per session, not per message
        assert isinstance(o.open(new_s.seal(b"%d" % i), NOW), Opened)
    assert o.take_rotated() == [("dev-1", 2)]
    assert o.take_rotated() == []
    # Refused or forged messages under the new key report nothing.
    assert reason(o.open(sealer(epoch=3, key=keys.generate(), key_id=2).seal(b"x"), NOW)) is Reason.BAD_AUTH
    assert o.take_rotated() == []
    # Once the registry retired key 1 (its grace over), a new session on key 2 reports nothing more.
    reg["dev-1"] = active({1: DEV, 2: new}, not_after={1: NOW})
    assert isinstance(o.open(sealer(epoch=4, key=new, key_id=2).seal(b"y"), NOW + 1), Opened)
    assert o.take_rotated() == []


def test_gateway_key_rotation_accepts_both_ids() -> None:
    gw2 = keys.generate()
    o = Opener(gateway_keys={1: GW, 2: gw2}, lookup={"dev-1": active({1: DEV})}.get)
    assert isinstance(o.open(sealer(epoch=1).seal(b"a"), NOW), Opened)
    assert isinstance(o.open(sealer(epoch=2, gateway=gw2, gateway_key_id=2).seal(b"b"), NOW), Opened)
    assert reason(o.open(sealer(epoch=3, gateway=gw2, gateway_key_id=1).seal(b"c"), NOW)) is Reason.BAD_AUTH


def test_session_rollover_and_stale_session() -> None:
    o = opener()
    first, second = sealer(epoch=7), sealer(epoch=8)
    early = [first.seal(b"%d" % i) for i in range(3)]
    assert isinstance(o.open(early[0], NOW), Opened)
    assert isinstance(o.open(second.seal(b"new"), NOW), Opened)
    assert reason(o.open(early[1], NOW)) is Reason.STALE_SESSION
    assert isinstance(o.open(second.seal(b"more"), NOW), Opened)


def test_forgery_with_new_epoch_moves_no_state() -> None:
    o = opener()
    s = sealer(epoch=5)
    assert isinstance(o.open(s.seal(b"a"), NOW), Opened)
    forged = sealer(epoch=99, key=keys.generate()).seal(b"evil")  # right id, wrong device key
    assert reason(o.open(forged, NOW)) is Reason.BAD_AUTH
    assert isinstance(o.open(s.seal(b"b"), NOW), Opened)  # epoch 5 still current


def test_session_cache_is_bounded_and_evicted_sessions_still_open() -> None:
    ids = [f"dev-{i}" for i in range(6)]
    o = opener({d: active({1: DEV}) for d in ids}, max_sessions=2)
    sealers = [sealer(d) for d in ids]
    for _ in range(2):
        for s in sealers:
            assert isinstance(o.open(s.seal(b"x"), NOW), Opened)
    assert len(o._sessions) <= 2
    assert set(o._windows) == set(ids)  # the replay windows are kept for every device


def test_forget_drops_device_state() -> None:
    o = opener()
    raw = sealer().seal(b"x")
    assert isinstance(o.open(raw, NOW), Opened)
    o.forget("dev-1")
    assert "dev-1" not in o._windows
    assert isinstance(o.open(raw, NOW), Opened)  # forget is for removed devices: the window is gone


def test_sealer_refuses_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        sealer("bad id")
    with pytest.raises(ConfigError):
        sealer(epoch=-1)
    with pytest.raises(ConfigError):
        sealer(key_id=1 << 32)
    with pytest.raises(ConfigError):
        Sealer(device_id="d", device_key=DEV, device_key_id=1, gateway_public=b"short", gateway_key_id=1,
               epoch=1)


def test_plaintext_stays_out_of_repr() -> None:
    got = opener().open(sealer().seal(b"secret-reading"), NOW)
    assert isinstance(got, Opened)
    assert "secret-reading" not in repr(got)


def test_fixed_ephemeral_is_deterministic_and_random_one_is_not() -> None:
    e = keys.private_from_bytes(bytes(range(64, 96)))
    assert sealer(ephemeral=e).seal(b"x") == sealer(ephemeral=e).seal(b"x")
    assert sealer().seal(b"x") != sealer().seal(b"x")


def test_configuration_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        Opener(gateway_keys={}, lookup={}.get)
    with pytest.raises(ConfigError):
        opener(window_bits=100)
    with pytest.raises(ConfigError):
        opener(max_message_bytes=0)
    with pytest.raises(ConfigError):  # a low-order gateway "key" cannot make a session
        Sealer(device_id="d", device_key=DEV, device_key_id=1, gateway_public=bytes(32), gateway_key_id=1,
               epoch=1)


def test_header_naming_another_device_than_the_transport_moves_nothing() -> None:
    """A device that stole dev-1's end-to-end key (not its certificate) can only publish on its own topic:
    the header's id must equal the transport's, checked before any lookup, so dev-1's state never moves."""
    o = opener({"dev-1": active({1: DEV}), "dev-2": active({1: keys.generate()})})
    honest = sealer(epoch=5)
    assert isinstance(o.open(honest.seal(b"a"), NOW, expected_device_id="dev-1"), Opened)
    far = sealer(epoch=2**63)  # genuinely sealed with dev-1's keys
    rejected = o.open(far.seal(b"evil"), NOW, expected_device_id="dev-2")
    assert reason(rejected) is Reason.TOPIC_MISMATCH
    assert isinstance(rejected, Rejected)
    assert rejected.device_id == "dev-2"  # the transport's identity: the one to blame
    assert isinstance(o.open(honest.seal(b"b"), NOW, expected_device_id="dev-1"), Opened)
    # Without a transport identity (e.g. tests of the core alone) the same message would open.
    assert isinstance(o.open(sealer(epoch=6).seal(b"c"), NOW), Opened)
