"""The sealed downlink (gateway -> device): round trips, every refusal reason, persisted replay state, the
sender bound, and the receipt range helpers against a naive set."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core import downlink as dl
from gateway.core import envelope as ev
from gateway.core import keys, ranges
from gateway.core.reasons import DownlinkReason, Reason
from gateway.core.session import DeviceKeys, KeyEntry, Opener, Rejected, Sealer
from gateway.core.topics import cmd_topic_for
from gateway.errors import ConfigError, LocalError
from gateway.pb import downlink_pb2 as pb
from gateway.pb import envelope_pb2

NOW = 1_800_000_000_000_000_000
FUTURE_MS = NOW // 1_000_000 + 60_000
GW = keys.private_from_bytes(bytes(range(32)))
GW2 = keys.private_from_bytes(bytes(range(100, 132)))
DEV_A = keys.private_from_bytes(bytes(range(32, 64)))
DEV_B = keys.private_from_bytes(bytes(range(64, 96)))
TOPIC_A = cmd_topic_for("dev-a")


def sealer(
    sender: str = "gw-1", epoch: int = 1, key: object = GW, key_id: int = 1, **kw: object
) -> dl.DownlinkSealer:
    return dl.DownlinkSealer(sender=sender, gateway_key=key, gateway_key_id=key_id, epoch=epoch, **kw)  # type: ignore[arg-type]


def opener(device_id: str = "dev-a", device_key: object = DEV_A, **kw: object) -> dl.DownlinkOpener:
    return dl.DownlinkOpener(
        device_id=device_id,
        device_keys={1: device_key},  # type: ignore[dict-item]
        trusted_gateways={1: keys.public_bytes(GW), 2: keys.public_bytes(GW2)},
        **kw,  # type: ignore[arg-type]
    )


def ping(cid: str = "c-1", expires_at_ms: int = FUTURE_MS) -> pb.Downlink:
    return pb.Downlink(command=pb.Command(id=cid, kind=pb.COMMAND_KIND_PING, expires_at_ms=expires_at_ms))


def seal_a(s: dl.DownlinkSealer, msg: pb.Downlink | None = None) -> bytes:
    return s.seal(msg or ping(), device_id="dev-a", device_public=keys.public_bytes(DEV_A), device_key_id=1)


def refused(o: dl.DownlinkOpener, raw: bytes, topic: str = TOPIC_A, now_ns: int = NOW) -> DownlinkReason:
    with pytest.raises(dl.DownlinkRefusedError) as info:
        o.open(raw, topic=topic, now_ns=now_ns)
    return info.value.reason


def with_header(raw: bytes, **changes: object) -> bytes:
    env = envelope_pb2.Envelope.FromString(raw)
    header = pb.DownlinkHeader.FromString(env.header)
    for k, v in changes.items():
        setattr(header, k, v)
    return ev.encode_envelope(header.SerializeToString(), env.ciphertext)


# --- round trips -------------------------------------------------------------------------------------


def test_command_and_receipt_round_trip() -> None:
    s, o = sealer(epoch=7), opener()
    cmd = pb.Downlink(
        command=pb.Command(
            id="set-1",
            kind=pb.COMMAND_KIND_SET_CONFIG,
            expires_at_ms=FUTURE_MS,
            config=[
                pb.ConfigEntry(key="summary_interval_s", value="30"),
                pb.ConfigEntry(key="log_level", value="debug"),
            ],
        )
    )
    got = o.open(seal_a(s, cmd), topic=TOPIC_A, now_ns=NOW)
    assert (got.sender, got.gateway_key_id, got.epoch, got.counter) == ("gw-1", 1, 7, 0)
    assert got.message == cmd
    accepted, _ = ranges.compact([(3, 0), (3, 1), (3, 2), (3, 9)])
    receipt = pb.Downlink(
        receipt=pb.Receipt(
            accepted=[pb.CounterRange(epoch=e, counter_first=f, counter_last=la) for e, f, la in accepted],
            rejected=[
                pb.Rejection(
                    range=pb.CounterRange(epoch=3, counter_first=4, counter_last=4),
                    reason=pb.REJECT_REASON_RATE_LIMITED,
                )
            ],
        )
    )
    got = o.open(seal_a(s, receipt), topic=TOPIC_A, now_ns=NOW)
    assert got.counter == 1 and got.message == receipt
    have = dl.receipt_ranges(got.message.receipt)
    assert ranges.contains(have, 3, 2) and ranges.contains(have, 3, 9)
    assert not ranges.contains(have, 3, 4) and not ranges.contains(have, 2, 0)
    assert "set-1" not in repr(got) and "summary" not in repr(got)  # the message stays out of reprs


def test_header_encoding_is_protobufs_own() -> None:
    fields = {
        "device_id": "Line_3.press-07",
        "sender": "gw-b",
        "epoch": (1 << 40) + 3,
        "counter": 0,
        "ephemeral": b"\x07" * 32,
        "device_key_id": 0,
        "gateway_key_id": 300,
    }
    for counter in (0, 1, 1 << 63):
        fields["counter"] = counter
        ours = dl.header_bytes(**fields)  # type: ignore[arg-type]
        theirs = pb.DownlinkHeader(version=1, suite=dl.DOWNLINK_SUITE, **fields).SerializeToString()  # type: ignore[arg-type]
        assert ours == theirs


def test_counter_is_shared_by_all_recipients_of_a_sender() -> None:
    s, oa, ob = sealer(), opener(), opener("dev-b", DEV_B)
    for i in range(3):
        raw_a = seal_a(s)
        raw_b = s.seal(ping(), device_id="dev-b", device_public=keys.public_bytes(DEV_B), device_key_id=1)
        assert oa.open(raw_a, topic=TOPIC_A, now_ns=NOW).counter == 2 * i
        assert ob.open(raw_b, topic=cmd_topic_for("dev-b"), now_ns=NOW).counter == 2 * i + 1
    assert s.next_counter == 6


def test_sealer_re_derives_an_evicted_device_without_repeating_a_nonce() -> None:
    s, o = sealer(max_cached_devices=1), opener()
    first = seal_a(s)
    s.seal(ping(), device_id="dev-b", device_public=keys.public_bytes(DEV_B), device_key_id=1)  # evicts dev-a
    second = seal_a(s)
    assert o.open(first, topic=TOPIC_A, now_ns=NOW).counter == 0
    assert o.open(second, topic=TOPIC_A, now_ns=NOW).counter == 2


# --- refusals ----------------------------------------------------------------------------------------


def test_a_message_for_device_a_is_refused_by_device_b() -> None:
    raw = seal_a(sealer())
    b = opener("dev-b", DEV_B)
    assert refused(b, raw, topic=TOPIC_A) == DownlinkReason.WRONG_DEVICE  # not b's topic
    assert refused(b, raw, topic=cmd_topic_for("dev-b")) == DownlinkReason.WRONG_DEVICE  # header names a
    # Rewriting the header to name b does not help: it was sealed to a's key, for a's topic.
    assert (
        refused(b, with_header(raw, device_id="dev-b"), topic=cmd_topic_for("dev-b")) == DownlinkReason.FORGED
    )
    # Even a device b that held a's key could not open it for its own topic: the topic is in the AAD.
    b_with_a_key = opener("dev-b", DEV_A)
    assert refused(b_with_a_key, with_header(raw, device_id="dev-b"), topic=cmd_topic_for("dev-b")) == (
        DownlinkReason.FORGED
    )


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda r: r[:-1] + bytes((r[-1] ^ 1,)), DownlinkReason.FORGED),
        (lambda r: with_header(r, counter=5), DownlinkReason.FORGED),
        (lambda r: with_header(r, epoch=2), DownlinkReason.FORGED),
        (lambda r: with_header(r, sender="gw-2"), DownlinkReason.FORGED),
        (lambda r: with_header(r, gateway_key_id=2), DownlinkReason.FORGED),  # trusted id, wrong key
        (lambda r: with_header(r, ephemeral=b"\x00" * 32), DownlinkReason.FORGED),  # low-order point
        (lambda r: with_header(r, version=2), DownlinkReason.UNSUPPORTED_VERSION),
        (lambda r: with_header(r, suite=1), DownlinkReason.UNSUPPORTED_VERSION),
        (lambda r: with_header(r, gateway_key_id=9), DownlinkReason.UNKNOWN_SENDER),
        (lambda r: with_header(r, device_key_id=2), DownlinkReason.UNKNOWN_KEY),
        (lambda r: with_header(r, sender=""), DownlinkReason.MALFORMED),
        (lambda r: with_header(r, sender="gw 1"), DownlinkReason.MALFORMED),
        (lambda r: with_header(r, ephemeral=b"\x09" * 31), DownlinkReason.MALFORMED),
        (lambda r: r + b"\x00", DownlinkReason.MALFORMED),
        (lambda r: r[:-1], DownlinkReason.MALFORMED),
        (lambda r: b"", DownlinkReason.MALFORMED),
        (lambda r: b"\x0a\x05\xff\xff\xff\xff\xff\x12\x10" + bytes(16), DownlinkReason.MALFORMED),
        (lambda r: b"\x00" * (dl.DEFAULT_MAX_MESSAGE_BYTES + 1), DownlinkReason.TOO_LARGE),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_every_header_refusal(mutate: object, reason: DownlinkReason) -> None:
    raw = seal_a(sealer())
    o = opener()
    assert refused(o, mutate(raw)) == reason  # type: ignore[operator]
    # Nothing refused moved the state: the original still opens, once.
    assert o.open(raw, topic=TOPIC_A, now_ns=NOW).counter == 0


def test_non_canonical_header_is_malformed() -> None:
    raw = seal_a(sealer())
    env = envelope_pb2.Envelope.FromString(raw)
    # A padded varint for version (0x81 0x00 = 1) and an unknown field appended: both parse to the same
    # header, neither is the sealer's encoding.
    padded = b"\x08\x81\x00" + env.header[2:]
    unknown = env.header + b"\x50\x01"
    o = opener()
    for header in (padded, unknown):
        assert refused(o, ev.encode_envelope(header, env.ciphertext)) == DownlinkReason.MALFORMED


def test_an_uplink_envelope_is_refused_and_a_downlink_is_refused_by_the_gateway() -> None:
    up = Sealer(
        device_id="dev-a",
        device_key=DEV_A,
        device_key_id=1,
        gateway_public=keys.public_bytes(GW),
        gateway_key_id=1,
        epoch=1,
    ).seal(b"hi")
    assert refused(opener(), up) == DownlinkReason.UNSUPPORTED_VERSION
    reg = {"dev-a": DeviceKeys("active", {1: KeyEntry(keys.public_bytes(DEV_A))})}
    got = Opener(gateway_keys={1: GW}, lookup=reg.get).open(seal_a(sealer()), NOW, "dev-a")
    assert isinstance(got, Rejected) and got.reason == Reason.UNSUPPORTED_VERSION


def test_an_untrusted_gateway_key_is_forged_or_unknown() -> None:
    rogue = keys.generate()
    raw = seal_a(sealer(key=rogue, key_id=1))  # claims a trusted id
    assert refused(opener(), raw) == DownlinkReason.FORGED
    raw = seal_a(sealer(key=rogue, key_id=77))
    assert refused(opener(), raw) == DownlinkReason.UNKNOWN_SENDER


def test_authenticated_but_invalid_body_is_malformed_and_spent() -> None:
    s, o = sealer(), opener()
    # The sealer refuses to make it, so seal a bare body by hand through the sealer's own key path.
    aead, head, tail, topic = s._recipient("dev-a", keys.public_bytes(DEV_A), 1)
    header = head + ev.counter_field(0) + tail
    bad = pb.Downlink(command=pb.Command(id="x", kind=pb.COMMAND_KIND_PING)).SerializeToString()  # no expiry
    raw = ev.encode_envelope(header, aead.encrypt(ev.nonce(0), bad, dl.associated_data(topic, header)))
    assert refused(o, raw) == DownlinkReason.MALFORMED
    assert refused(o, raw) == DownlinkReason.REPLAY  # it authenticated, so its counter is spent
    header = head + ev.counter_field(1) + tail
    raw = ev.encode_envelope(
        header, aead.encrypt(ev.nonce(1), b"\xff\xff", dl.associated_data(topic, header))
    )
    assert refused(o, raw) == DownlinkReason.MALFORMED


def test_expired_command() -> None:
    s, o = sealer(), opener()
    assert refused(o, seal_a(s, ping(expires_at_ms=NOW // 1_000_000))) == DownlinkReason.EXPIRED
    assert o.open(seal_a(s, ping(expires_at_ms=NOW // 1_000_000 + 1)), topic=TOPIC_A, now_ns=NOW).counter == 1


def test_replay_stale_epoch_and_reorder_inside_and_outside_the_window() -> None:
    o = opener(window_bits=1024)
    s = sealer(epoch=5)
    msgs = [seal_a(s) for _ in range(1100)]
    assert o.open(msgs[10], topic=TOPIC_A, now_ns=NOW).counter == 10
    assert o.open(msgs[3], topic=TOPIC_A, now_ns=NOW).counter == 3  # reordered, inside the window
    assert refused(o, msgs[3]) == DownlinkReason.REPLAY
    assert o.open(msgs[1099], topic=TOPIC_A, now_ns=NOW).counter == 1099
    assert refused(o, msgs[75]) == DownlinkReason.TOO_OLD  # 1024 or more behind, never seen
    assert o.open(msgs[76], topic=TOPIC_A, now_ns=NOW).counter == 76  # just inside
    # A restarted gateway (new epoch) moves the window; the old session is stale from then on.
    s2 = sealer(epoch=6)
    assert o.open(seal_a(s2), topic=TOPIC_A, now_ns=NOW).epoch == 6
    assert refused(o, msgs[500]) == DownlinkReason.STALE_EPOCH


def test_senders_have_their_own_windows_and_are_bounded() -> None:
    o = opener(max_senders=2)
    s1, s2, s3 = sealer("gw-1", epoch=9), sealer("gw-2", epoch=1, key=GW2, key_id=2), sealer("gw-3")
    assert o.open(seal_a(s1), topic=TOPIC_A, now_ns=NOW).sender == "gw-1"
    assert o.open(seal_a(s2), topic=TOPIC_A, now_ns=NOW).sender == "gw-2"  # lower epoch: its own window
    assert refused(o, seal_a(s3)) == DownlinkReason.TOO_MANY_SENDERS
    assert o.open(seal_a(s1), topic=TOPIC_A, now_ns=NOW).counter == 1  # known senders still work
    state = o.state()
    assert state.count(b"gw-") == 2


def test_forged_messages_do_not_claim_a_sender_slot() -> None:
    o = opener(max_senders=1)
    forged = seal_a(sealer("gw-x", key=keys.generate(), key_id=1))
    for _ in range(3):
        assert refused(o, forged) == DownlinkReason.FORGED
    assert o.open(seal_a(sealer("gw-1")), topic=TOPIC_A, now_ns=NOW).sender == "gw-1"


def test_refusal_text_leaks_nothing() -> None:
    raw = seal_a(sealer("gw-secret-name"), ping("cmd-secret-id"))
    o = opener()
    o.open(raw, topic=TOPIC_A, now_ns=NOW)
    with pytest.raises(dl.DownlinkRefusedError) as info:
        o.open(raw, topic=TOPIC_A, now_ns=NOW)
    text = str(info.value) + repr(info.value)
    assert text == "downlink refused: replayDownlinkRefusedError('downlink refused: replay')"
    assert info.value.reason == "replay" and info.value.__cause__ is None


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_damaged_envelopes_only_ever_raise_a_refusal(data: st.DataObject) -> None:
    raw = bytearray(seal_a(sealer(), make_receipt_body()))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw[i : i + data.draw(st.integers(1, 8))]
        else:
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    o = opener()
    try:
        o.open(bytes(raw), topic=TOPIC_A, now_ns=NOW)
    except dl.DownlinkRefusedError as exc:
        assert exc.reason in DownlinkReason


def make_receipt_body() -> pb.Downlink:
    accepted, _ = ranges.compact([(1, c) for c in (0, 1, 2, 5, 6, 9)])
    return dl.make_receipt(accepted, [((1, 3, 4), pb.REJECT_REASON_REVOKED)])


def test_make_receipt_round_trips() -> None:
    body = make_receipt_body()
    got = opener().open(seal_a(sealer(), body), topic=TOPIC_A, now_ns=NOW).message
    assert dl.receipt_ranges(got.receipt) == [(1, 0, 2), (1, 5, 6), (1, 9, 9)]
    assert got.receipt.rejected[0].reason == pb.REJECT_REASON_REVOKED


# --- persisted state ---------------------------------------------------------------------------------


def test_replay_is_refused_after_restoring_persisted_state() -> None:
    s = sealer(epoch=3)
    msgs = [seal_a(s) for _ in range(5)]
    o = opener()
    assert not o.take_changed()
    for i in (0, 1, 3):
        o.open(msgs[i], topic=TOPIC_A, now_ns=NOW)
    assert o.take_changed() and not o.take_changed()
    saved = o.state()
    assert saved.startswith(b"sgwd\x01")
    restarted = opener()
    restarted.load_state(saved)
    for i in (0, 1, 3):
        assert refused(restarted, msgs[i]) == DownlinkReason.REPLAY
    assert restarted.open(msgs[2], topic=TOPIC_A, now_ns=NOW).counter == 2
    assert restarted.open(msgs[4], topic=TOPIC_A, now_ns=NOW).counter == 4
    # A fresh agent without the state would accept a replay: that is why the agent persists it.
    assert opener().open(msgs[0], topic=TOPIC_A, now_ns=NOW).counter == 0


def test_state_round_trips_empty_and_into_another_width() -> None:
    o = opener()
    empty = o.state()
    o.load_state(empty)
    assert o.state() == empty
    o.open(seal_a(sealer()), topic=TOPIC_A, now_ns=NOW)
    wider = opener(window_bits=8192)
    wider.load_state(o.state())
    assert refused(wider, seal_a(sealer(first_counter=0))) == DownlinkReason.REPLAY


def test_corrupt_or_foreign_state_is_refused_and_nothing_is_loaded() -> None:
    o = opener()
    o.open(seal_a(sealer("gw-1")), topic=TOPIC_A, now_ns=NOW)
    o.open(seal_a(sealer("gw-2", key=GW2, key_id=2)), topic=TOPIC_A, now_ns=NOW)
    good = o.state()
    bad = [
        b"",
        b"sgwd",
        b"sgwx" + good[4:],
        good[:4] + b"\x02" + good[5:],
        good + b"\x00",
        good[:-1],
        good[:7] + b"dev-b" + good[12:],  # another device's state
        good[:12] + b"\x09" + good[13:],  # more senders than max_senders
        good[:12] + bytes((3,)) + good[13:],  # claims more senders than the bytes hold
    ]
    fresh = opener()
    for data in bad:
        with pytest.raises(LocalError):
            fresh.load_state(data)
    with pytest.raises(LocalError):
        opener(max_senders=1).load_state(good)
    assert fresh.state() == opener().state()  # nothing half-loaded
    fresh.load_state(good)
    assert fresh.state() == good


def test_random_damage_to_state_never_loads_something_else() -> None:
    o = opener()
    for n in (1, 5, 9):
        o.open(seal_a(sealer("gw-1", first_counter=n)), topic=TOPIC_A, now_ns=NOW)
    good = o.state()
    rng = random.Random(15)
    for _ in range(300):
        data = bytearray(good)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        target = opener()
        try:
            target.load_state(bytes(data))
        except LocalError:
            continue
        # Flipping a bit inside the bitmap or a counter can still be a valid state; it must then be
        # exactly what the bytes say.
        assert target.state() == bytes(data)


# --- configuration and sealing refusals --------------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        pb.Downlink(),
        pb.Downlink(command=pb.Command(id="c", kind=pb.COMMAND_KIND_PING)),
        pb.Downlink(command=pb.Command(id="", kind=pb.COMMAND_KIND_PING, expires_at_ms=1)),
        pb.Downlink(command=pb.Command(id="a b", kind=pb.COMMAND_KIND_PING, expires_at_ms=1)),
        pb.Downlink(command=pb.Command(id="c", expires_at_ms=1)),
        pb.Downlink(
            command=pb.Command(
                id="c", kind=pb.COMMAND_KIND_PING, expires_at_ms=1, config=[pb.ConfigEntry(key="k")]
            )
        ),
        pb.Downlink(
            command=pb.Command(
                id="c",
                kind=pb.COMMAND_KIND_SET_CONFIG,
                expires_at_ms=1,
                config=[pb.ConfigEntry(key="k", value="v" * 257)],
            )
        ),
        pb.Downlink(
            command=pb.Command(
                id="c",
                kind=pb.COMMAND_KIND_SET_CONFIG,
                expires_at_ms=1,
                config=[pb.ConfigEntry(key="k")] * 33,
            )
        ),
        pb.Downlink(receipt=pb.Receipt(accepted=[pb.CounterRange(epoch=1, counter_first=5, counter_last=4)])),
        pb.Downlink(
            receipt=pb.Receipt(
                accepted=[
                    pb.CounterRange(epoch=1, counter_first=0, counter_last=4),
                    pb.CounterRange(epoch=1, counter_first=5, counter_last=6),  # touches: not compact
                ]
            )
        ),
        pb.Downlink(
            receipt=pb.Receipt(accepted=[pb.CounterRange(epoch=1, counter_first=2 * i) for i in range(257)])
        ),
        pb.Downlink(receipt=pb.Receipt(rejected=[pb.Rejection(range=pb.CounterRange(epoch=1))])),  # no reason
    ],
)
def test_sealer_refuses_what_the_opener_would(msg: pb.Downlink) -> None:
    assert dl.body_problem(msg) is not None
    with pytest.raises(LocalError):
        seal_a(sealer(), msg)


def test_sealer_refuses_an_unusable_device_key() -> None:
    with pytest.raises(LocalError):
        sealer().seal(ping(), device_id="dev-a", device_public=b"\x00" * 32, device_key_id=1)
    with pytest.raises(LocalError):
        sealer().seal(ping(), device_id="dev-a", device_public=b"short", device_key_id=1)
    with pytest.raises(LocalError):
        sealer().seal(ping(), device_id="dev a", device_public=keys.public_bytes(DEV_A), device_key_id=1)


def test_bad_configuration() -> None:
    with pytest.raises(ConfigError):
        sealer(sender="gw 1")
    with pytest.raises(ConfigError):
        opener(max_senders=0)
    with pytest.raises(ConfigError):
        opener(window_bits=1000)
    with pytest.raises(ConfigError):
        dl.DownlinkOpener(device_id="dev-a", device_keys={1: DEV_A}, trusted_gateways={1: b"\x00" * 32})
    with pytest.raises(ConfigError):
        dl.DownlinkOpener(device_id="dev-a", device_keys={1: DEV_A}, trusted_gateways={})


def test_parse_reply_bounds() -> None:
    reply = pb.CommandReply(command_id="c-1", ok=True, values=[pb.ConfigEntry(key="log_level", value="info")])
    assert dl.parse_reply(reply.SerializeToString()) == reply
    for bad in (
        pb.CommandReply(command_id=""),
        pb.CommandReply(command_id="c", error="e" * 257),
        pb.CommandReply(command_id="c", status=b"s" * 1025),
    ):
        with pytest.raises(dl.DownlinkRefusedError) as info:
            dl.parse_reply(bad.SerializeToString())
        assert info.value.reason == DownlinkReason.MALFORMED
    with pytest.raises(dl.DownlinkRefusedError):
        dl.parse_reply(b"\xff")
    with pytest.raises(dl.DownlinkRefusedError) as info:
        dl.parse_reply(b"\x00" * (dl.MAX_REPLY_BYTES + 1))
    assert info.value.reason == DownlinkReason.TOO_LARGE


# --- ranges --------------------------------------------------------------------------------------------


def test_compact_examples() -> None:
    got, rest = ranges.compact([(1, 5), (1, 3), (1, 4), (1, 4), (2, 0), (1, 9), (0, 7)])
    assert got == [(0, 7, 7), (1, 3, 5), (1, 9, 9), (2, 0, 0)] and rest == []
    assert ranges.is_canonical(got)
    got, rest = ranges.compact([(1, c) for c in range(0, 20, 2)], max_ranges=3)
    assert got == [(1, 0, 0), (1, 2, 2), (1, 4, 4)] and rest == [(1, c) for c in range(6, 20, 2)]
    assert ranges.compact([]) == ([], [])
    with pytest.raises(LocalError):
        ranges.compact([(1, 1)], max_ranges=0)
    with pytest.raises(LocalError):
        ranges.contains([(1, 2 * i, 2 * i) for i in range(ranges.MAX_RANGES + 1)], 1, 0)
    assert not ranges.is_canonical([(1, 0, 0)] * (ranges.MAX_RANGES + 1))
    assert not ranges.is_canonical([(2, 0, 0), (1, 0, 0)])
    assert ranges.is_canonical([(1, 0, ev.MAX_U64), (2, 0, 0)])


pairs_strategy = st.sets(st.tuples(st.integers(0, 3), st.integers(0, 60)), max_size=120)


@settings(max_examples=300, deadline=None)
@given(pairs=pairs_strategy, max_ranges=st.integers(1, 40))
def test_compact_agrees_with_a_naive_set(pairs: set[tuple[int, int]], max_ranges: int) -> None:
    got, rest = ranges.compact(pairs, max_ranges)
    assert ranges.is_canonical(got, max_ranges) and len(got) <= max_ranges
    covered = {(e, c) for e, f, la in got for c in range(f, la + 1)}
    assert covered | set(rest) == pairs and not covered & set(rest)
    assert rest == sorted(rest) and all(p > max(covered) for p in rest)
    assert (not rest) or len(got) == max_ranges
    for epoch in range(5):
        for counter in range(63):
            assert ranges.contains(got, epoch, counter) == ((epoch, counter) in covered)


def test_compact_random_large_sets() -> None:
    rng = random.Random(1515)
    for _ in range(50):
        pairs = {(rng.randrange(3), rng.randrange(1 << 62)) for _ in range(rng.randrange(50))}
        pairs |= {(1, c) for c in range(rng.randrange(1000), rng.randrange(1000, 3000))}  # one long run
        got, rest = ranges.compact(pairs)
        assert not rest
        for p in pairs:
            assert ranges.contains(got, *p)
        for _ in range(200):
            q = (rng.randrange(3), rng.randrange(4000))
            assert ranges.contains(got, *q) == (q in pairs)
