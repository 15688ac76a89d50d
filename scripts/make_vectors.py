#!/usr/bin/env python3
"""Writes tests/vectors/envelope_v1.json (uplink), envelope_hybrid_v1.json (uplink suite 3) and
downlink_v1.json: fixed keys and ephemerals, every intermediate value in hex.

Deterministic (keys are SHA-256 of fixed labels), so rerunning changes nothing; tests/test_core_vectors.py
and tests/test_core_downlink_vectors.py check the files against the code. Another implementation (C on a
microcontroller, say) can check its key schedule, nonce, header encoding and envelope bytes against them
step by step.

Usage: python scripts/make_vectors.py [--check]
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from google.protobuf.json_format import MessageToDict

from gateway.core import downlink as dl
from gateway.core import envelope as ev
from gateway.core import keys, suites
from gateway.core.session import DeviceKeys, KeyEntry, Opened, Opener, Sealer
from gateway.core.topics import cmd_topic_for
from gateway.pb import downlink_pb2, envelope_pb2, messages_pb2

OUT = Path(__file__).resolve().parent.parent / "tests" / "vectors" / "envelope_v1.json"
DOWNLINK_OUT = OUT.with_name("downlink_v1.json")
NOW_NS = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z, the "now" every rejection vector uses


def _secret(label: str) -> bytes:
    return hashlib.sha256(b"sgw/v1 test vector " + label.encode()).digest()


def _plaintext_window() -> bytes:
    values = (1, -2, 3, 400, -500, 600, 7, 8, 9, -32768, 0, 32767)
    samples = b"".join(v.to_bytes(2, "little", signed=True) for v in values)
    window = messages_pb2.TelemetryWindow(
        kind=messages_pb2.SENSOR_KIND_VIBRATION, sample_rate_hz=1600.0, start_ns=NOW_NS - 2_500_000,
        shape=[4, 3], encoding=messages_pb2.SAMPLE_ENCODING_INT16_SCALED, scale=0.001, samples=samples,
        prefilter_score=0.75, prefilter_version="vib-1", window_seq=42,
        reason=messages_pb2.FORWARD_REASON_ANOMALY,
    )
    return messages_pb2.Plaintext(sealed_at_ns=NOW_NS, window=window).SerializeToString()


CASES: list[dict[str, Any]] = [
    {"name": "basic", "device_id": "dev-0001", "epoch": 1, "device_key_id": 1, "gateway_key_id": 1,
     "messages": [(0, "window"), (1, ""), (2, "68656c6c6f")]},
    {"name": "wide-fields", "device_id": "Line_3.press-07", "epoch": (1 << 40) + 3, "device_key_id": 300,
     "gateway_key_id": 7, "messages": [((1 << 32) + 5, "window"), ((1 << 64) - 1, "ff" * 64)]},
]


def _vector(case: dict[str, Any]) -> dict[str, Any]:
    name = case["name"]
    dev = keys.private_from_bytes(_secret(name + " device"))
    gw = keys.private_from_bytes(_secret(name + " gateway"))
    eph = keys.private_from_bytes(_secret(name + " ephemeral"))
    dev_pub, gw_pub, eph_pub = keys.public_bytes(dev), keys.public_bytes(gw), keys.public_bytes(eph)
    gw_key = keys.public_from_bytes(gw_pub)
    dh_es, dh_ss = eph.exchange(gw_key), dev.exchange(gw_key)
    info = ev.kdf_info(
        ephemeral_pub=eph_pub, device_pub=dev_pub, gateway_pub=gw_pub, device_id=case["device_id"],
        epoch=case["epoch"], device_key_id=case["device_key_id"], gateway_key_id=case["gateway_key_id"],
    )
    messages = []
    for counter, body in case["messages"]:
        plaintext = _plaintext_window() if body == "window" else bytes.fromhex(body)
        sealer = Sealer(
            device_id=case["device_id"], device_key=dev, device_key_id=case["device_key_id"],
            gateway_public=gw_pub, gateway_key_id=case["gateway_key_id"], epoch=case["epoch"],
            ephemeral=eph, first_counter=counter,
        )
        raw = sealer.seal(plaintext)
        env = envelope_pb2.Envelope.FromString(raw)
        messages.append({
            "counter": counter, "plaintext": plaintext.hex(), "nonce": ev.nonce(counter).hex(),
            "header": env.header.hex(), "ciphertext": env.ciphertext.hex(), "envelope": raw.hex(),
        })
    return {
        "name": name, "device_id": case["device_id"], "epoch": case["epoch"],
        "device_key_id": case["device_key_id"], "gateway_key_id": case["gateway_key_id"],
        "device_private": _secret(name + " device").hex(), "device_public": dev_pub.hex(),
        "gateway_private": _secret(name + " gateway").hex(), "gateway_public": gw_pub.hex(),
        "ephemeral_private": _secret(name + " ephemeral").hex(), "ephemeral_public": eph_pub.hex(),
        "dh_es": dh_es.hex(), "dh_ss": dh_ss.hex(), "hkdf_info": info.hex(),
        "session_key": ev.session_key(dh_es, dh_ss, info).hex(), "messages": messages,
    }


def _with_header(raw: bytes, **changes: Any) -> bytes:
    env = envelope_pb2.Envelope.FromString(raw)
    header = envelope_pb2.Header.FromString(env.header)
    for key, value in changes.items():
        setattr(header, key, value)
    return ev.encode_envelope(header.SerializeToString(), env.ciphertext)


def _rejections(basic: dict[str, Any]) -> list[dict[str, Any]]:
    m0 = bytes.fromhex(basic["messages"][0]["envelope"])
    flipped_tag = m0[:-1] + bytes((m0[-1] ^ 0x01,))
    cases = {
        "tag bit flipped": (flipped_tag, "bad_auth"),
        "counter changed in header": (_with_header(m0, counter=1), "bad_auth"),
        "epoch changed in header": (_with_header(m0, epoch=2), "bad_auth"),
        "version 2": (_with_header(m0, version=2), "unsupported_version"),
        "suite 2": (_with_header(m0, suite=2), "unsupported_version"),
        "unregistered device": (_with_header(m0, device_id="dev-0002"), "unknown_device"),
        "unknown device key id": (_with_header(m0, device_key_id=2), "bad_auth"),
        "unknown gateway key id": (_with_header(m0, gateway_key_id=2), "bad_auth"),
        "short ephemeral": (_with_header(m0, ephemeral=b"\x09" * 31), "malformed"),
        "low-order ephemeral": (_with_header(m0, ephemeral=b"\x00" * 32), "bad_auth"),
        "trailing byte": (m0 + b"\x00", "malformed"),
        "truncated": (m0[:-1], "malformed"),
        "empty": (b"", "malformed"),
    }
    return [{"name": k, "envelope": raw.hex(), "reason": reason} for k, (raw, reason) in cases.items()]


def _sequence(basic: dict[str, Any]) -> list[dict[str, Any]]:
    """Replay behaviour on one fresh gateway: order matters."""
    m = [msg["envelope"] for msg in basic["messages"]]
    steps = [(m[0], "accepted"), (m[0], "replay"), (m[2], "accepted"), (m[1], "accepted"), (m[1], "replay")]
    return [{"envelope": raw, "outcome": outcome} for raw, outcome in steps]


def build() -> dict[str, Any]:
    vectors = [_vector(case) for case in CASES]
    doc = {
        "description": "sgw wire format v1 test vectors (docs/PROTOCOL.md). Byte strings are hex.",
        "suite": {"version": ev.VERSION, "suite": ev.SUITE, "hkdf_salt": ev.HKDF_SALT.hex(),
                  "hkdf_label": ev.HKDF_LABEL.hex(), "nonce_prefix": ev.NONCE_PREFIX.hex()},
        "now_ns": NOW_NS,
        "vectors": vectors,
        "rejections": _rejections(vectors[0]),
        "sequence": _sequence(vectors[0]),
    }
    _self_check(doc)
    return doc


def _self_check(doc: dict[str, Any]) -> None:
    """Refuse to write vectors the Opener itself disagrees with."""
    basic = doc["vectors"][0]
    entry = KeyEntry(bytes.fromhex(basic["device_public"]))
    registry = {basic["device_id"]: DeviceKeys("active", {basic["device_key_id"]: entry})}
    gw = {basic["gateway_key_id"]: keys.private_from_bytes(bytes.fromhex(basic["gateway_private"]))}
    for case in doc["rejections"]:
        opener = Opener(gateway_keys=gw, lookup=registry.get)
        got = opener.open(bytes.fromhex(case["envelope"]), doc["now_ns"])
        if isinstance(got, Opened) or got.reason != case["reason"]:
            raise SystemExit(f"rejection vector {case['name']!r}: got {got!r}")


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2) + "\n"


# --- downlink (gateway -> device), docs/PROTOCOL.md "Downlink" -----------------------------------------

NOW_MS = NOW_NS // 1_000_000
DL = downlink_pb2


def _downlink_bodies() -> dict[str, downlink_pb2.Downlink]:
    return {
        "ping": DL.Downlink(
            command=DL.Command(id="cmd-0001", kind=DL.COMMAND_KIND_PING, expires_at_ms=NOW_MS + 60_000)
        ),
        "set_config": DL.Downlink(
            command=DL.Command(
                id="cmd-0002",
                kind=DL.COMMAND_KIND_SET_CONFIG,
                expires_at_ms=NOW_MS + 60_000,
                config=[
                    DL.ConfigEntry(key="summary_interval_s", value="30"),
                    DL.ConfigEntry(key="log_level", value="debug"),
                ],
            )
        ),
        "receipt": DL.Downlink(
            receipt=DL.Receipt(
                accepted=[
                    DL.CounterRange(epoch=1, counter_first=0, counter_last=41),
                    DL.CounterRange(epoch=1, counter_first=43, counter_last=43),
                    DL.CounterRange(epoch=2, counter_first=0, counter_last=0),
                ],
                rejected=[
                    DL.Rejection(
                        range=DL.CounterRange(epoch=1, counter_first=42, counter_last=42),
                        reason=DL.REJECT_REASON_RATE_LIMITED,
                    )
                ],
            )
        ),
        "rotate_key": DL.Downlink(
            command=DL.Command(id="rot-7", kind=DL.COMMAND_KIND_ROTATE_KEY, expires_at_ms=(1 << 63) + 1)
        ),
        # Step 2 of a rotation from the device; the certificate is opaque bytes to the wire format (the
        # agent's checks of it are in tests/test_rotation.py), a fixed stand-in keeps the vector stable.
        "rotate_key install": DL.Downlink(
            command=DL.Command(id="rot-8", kind=DL.COMMAND_KIND_ROTATE_KEY, expires_at_ms=NOW_MS + 60_000,
                               new_key_id=2, certificate=bytes(range(48)))
        ),
    }


DOWNLINK_CASES: list[dict[str, Any]] = [
    {
        "name": "basic",
        "device_id": "dev-0001",
        "sender": "gw-1",
        "epoch": 1,
        "device_key_id": 1,
        "gateway_key_id": 1,
        "messages": [(0, "ping"), (1, "receipt"), (2, "set_config")],
    },
    {
        "name": "wide-fields",
        "device_id": "Line_3.press-07",
        "sender": "gateway.eu-west_2",
        "epoch": (1 << 40) + 3,
        "device_key_id": 300,
        "gateway_key_id": 7,
        "messages": [
            ((1 << 32) + 5, "receipt"), ((1 << 32) + 6, "rotate_key install"), ((1 << 64) - 1, "rotate_key"),
        ],
    },
]


def _downlink_keys(name: str) -> tuple[X25519PrivateKey, X25519PrivateKey, X25519PrivateKey]:
    """(device, gateway, ephemeral) private keys of a downlink case."""
    dev, gw, eph = (_secret(f"downlink {name} {role}") for role in ("device", "gateway", "ephemeral"))
    return keys.private_from_bytes(dev), keys.private_from_bytes(gw), keys.private_from_bytes(eph)


def _downlink_vector(case: dict[str, Any]) -> dict[str, Any]:
    name = case["name"]
    dev, gw, eph = _downlink_keys(name)
    dev_pub, gw_pub, eph_pub = keys.public_bytes(dev), keys.public_bytes(gw), keys.public_bytes(eph)
    dev_key = keys.public_from_bytes(dev_pub)
    dh_es, dh_ss = eph.exchange(dev_key), gw.exchange(dev_key)
    info = dl.kdf_info(
        ephemeral_pub=eph_pub,
        gateway_pub=gw_pub,
        device_pub=dev_pub,
        device_id=case["device_id"],
        sender=case["sender"],
        epoch=case["epoch"],
        device_key_id=case["device_key_id"],
        gateway_key_id=case["gateway_key_id"],
    )
    topic = cmd_topic_for(case["device_id"])
    bodies = _downlink_bodies()
    messages = []
    for counter, body in case["messages"]:
        sealer = dl.DownlinkSealer(
            sender=case["sender"],
            gateway_key=gw,
            gateway_key_id=case["gateway_key_id"],
            epoch=case["epoch"],
            ephemeral=eph,
            first_counter=counter,
        )
        raw = sealer.seal(
            bodies[body],
            device_id=case["device_id"],
            device_public=dev_pub,
            device_key_id=case["device_key_id"],
        )
        env = envelope_pb2.Envelope.FromString(raw)
        messages.append(
            {
                "counter": counter,
                "body": body,
                "message": MessageToDict(bodies[body]),
                "plaintext": bodies[body].SerializeToString().hex(),
                "nonce": ev.nonce(counter).hex(),
                "header": env.header.hex(),
                "aad": dl.associated_data(topic, env.header).hex(),
                "ciphertext": env.ciphertext.hex(),
                "envelope": raw.hex(),
            }
        )
    return {
        "name": name,
        "device_id": case["device_id"],
        "topic": topic,
        "sender": case["sender"],
        "epoch": case["epoch"],
        "device_key_id": case["device_key_id"],
        "gateway_key_id": case["gateway_key_id"],
        "device_private": keys.private_to_bytes(dev).hex(),
        "device_public": dev_pub.hex(),
        "gateway_private": keys.private_to_bytes(gw).hex(),
        "gateway_public": gw_pub.hex(),
        "ephemeral_private": keys.private_to_bytes(eph).hex(),
        "ephemeral_public": eph_pub.hex(),
        "dh_es": dh_es.hex(),
        "dh_ss": dh_ss.hex(),
        "hkdf_info": info.hex(),
        "session_key": ev.session_key(dh_es, dh_ss, info).hex(),
        "messages": messages,
    }


def _with_downlink_header(raw: bytes, **changes: Any) -> bytes:
    env = envelope_pb2.Envelope.FromString(raw)
    header = downlink_pb2.DownlinkHeader.FromString(env.header)
    for key, value in changes.items():
        setattr(header, key, value)
    return ev.encode_envelope(header.SerializeToString(), env.ciphertext)


def _downlink_rejections(basic: dict[str, Any]) -> list[dict[str, Any]]:
    """Each against a fresh opener for the basic device, at now_ns, on the topic given."""
    m0 = bytes.fromhex(basic["messages"][0]["envelope"])
    topic = basic["topic"]
    # Sealed for another device (same gateway): delivered on this device's topic.
    other = dl.DownlinkSealer(
        sender=basic["sender"],
        gateway_key=keys.private_from_bytes(bytes.fromhex(basic["gateway_private"])),
        gateway_key_id=1,
        epoch=1,
        ephemeral=keys.private_from_bytes(_secret("downlink other ephemeral")),
    )
    foreign = other.seal(
        _downlink_bodies()["ping"],
        device_id="dev-0002",
        device_public=keys.public_bytes(keys.private_from_bytes(_secret("downlink other device"))),
        device_key_id=1,
    )
    expired = dl.DownlinkSealer(
        sender=basic["sender"],
        gateway_key=keys.private_from_bytes(bytes.fromhex(basic["gateway_private"])),
        gateway_key_id=1,
        epoch=1,
        ephemeral=keys.private_from_bytes(bytes.fromhex(basic["ephemeral_private"])),
        first_counter=9,
    )
    old = expired.seal(
        DL.Downlink(command=DL.Command(id="cmd-old", kind=DL.COMMAND_KIND_PING, expires_at_ms=NOW_MS)),
        device_id=basic["device_id"],
        device_public=bytes.fromhex(basic["device_public"]),
        device_key_id=1,
    )
    uplink = bytes.fromhex(build()["vectors"][0]["messages"][1]["envelope"])
    cases = {
        "tag bit flipped": (m0[:-1] + bytes((m0[-1] ^ 0x01,)), topic, "forged"),
        "counter changed in header": (_with_downlink_header(m0, counter=1), topic, "forged"),
        "epoch changed in header": (_with_downlink_header(m0, epoch=2), topic, "forged"),
        "sender changed in header": (_with_downlink_header(m0, sender="gw-2"), topic, "forged"),
        "low-order ephemeral": (_with_downlink_header(m0, ephemeral=b"\x00" * 32), topic, "forged"),
        "version 2": (_with_downlink_header(m0, version=2), topic, "unsupported_version"),
        "uplink suite": (_with_downlink_header(m0, suite=1), topic, "unsupported_version"),
        "an uplink envelope reflected to the device": (uplink, topic, "unsupported_version"),
        "another device's topic": (m0, cmd_topic_for("dev-0002"), "wrong_device"),
        "sealed for another device": (foreign, topic, "wrong_device"),
        "untrusted gateway key id": (_with_downlink_header(m0, gateway_key_id=2), topic, "unknown_sender"),
        "unknown device key id": (_with_downlink_header(m0, device_key_id=2), topic, "unknown_key"),
        "unknown header field": (
            ev.encode_envelope(
                envelope_pb2.Envelope.FromString(m0).header + b"\x50\x01",
                envelope_pb2.Envelope.FromString(m0).ciphertext,
            ),
            topic,
            "malformed",
        ),
        "short ephemeral": (_with_downlink_header(m0, ephemeral=b"\x09" * 31), topic, "malformed"),
        "trailing byte": (m0 + b"\x00", topic, "malformed"),
        "truncated": (m0[:-1], topic, "malformed"),
        "empty": (b"", topic, "malformed"),
        "over 16384 bytes": (b"\x00" * (dl.DEFAULT_MAX_MESSAGE_BYTES + 1), topic, "too_large"),
        "command expired at now": (old, topic, "expired"),
    }
    return [
        {"name": k, "envelope": raw.hex(), "topic": t, "reason": reason}
        for k, (raw, t, reason) in cases.items()
    ]


def _downlink_sequence(basic: dict[str, Any]) -> list[dict[str, Any]]:
    """Replay behaviour on one fresh opener: order matters."""
    m = [msg["envelope"] for msg in basic["messages"]]
    steps = [(m[0], "accepted"), (m[0], "replay"), (m[2], "accepted"), (m[1], "accepted"), (m[1], "replay")]
    return [{"envelope": raw, "outcome": outcome} for raw, outcome in steps]


def _replies() -> list[dict[str, Any]]:
    """Device -> gateway CommandReply encodings (how the reply is sealed is the uplink's business)."""
    status = messages_pb2.DeviceStatus(
        state=messages_pb2.DeviceStatus.STATE_HEARTBEAT,
        agent_version="0.1.0",
        uptime_s=3600,
        windows_seen=1000,
        windows_forwarded=12,
    )
    replies = {
        "ping ok": DL.CommandReply(command_id="cmd-0001", ok=True),
        "status": DL.CommandReply(command_id="cmd-0003", ok=True, status=status.SerializeToString()),
        "set_config refused": DL.CommandReply(
            command_id="cmd-0002",
            ok=False,
            error="unknown key: colour",
            values=[DL.ConfigEntry(key="log_level", value="info")],
        ),
        "rotate_key proposal": DL.CommandReply(
            command_id="rot-7", ok=True, new_key_id=2, new_e2e_public=bytes(range(32)),
            csr=bytes(range(64, 112)),  # opaque to the wire format, as the certificate above
        ),
    }
    return [
        {"name": k, "message": MessageToDict(r), "encoded": r.SerializeToString().hex()}
        for k, r in replies.items()
    ]


def build_downlink() -> dict[str, Any]:
    vectors = [_downlink_vector(case) for case in DOWNLINK_CASES]
    doc = {
        "description": "sgw downlink v1 test vectors (docs/PROTOCOL.md, Downlink). Byte strings are hex.",
        "suite": {
            "version": ev.VERSION,
            "suite": dl.DOWNLINK_SUITE,
            "hkdf_salt": ev.HKDF_SALT.hex(),
            "hkdf_label": dl.DOWNLINK_LABEL.hex(),
            "nonce_prefix": ev.NONCE_PREFIX.hex(),
        },
        "now_ns": NOW_NS,
        "window_bits": dl.DEFAULT_WINDOW_BITS,
        "vectors": vectors,
        "rejections": _downlink_rejections(vectors[0]),
        "sequence": _downlink_sequence(vectors[0]),
        "replies": _replies(),
    }
    _downlink_self_check(doc)
    return doc


def downlink_opener(v: dict[str, Any]) -> dl.DownlinkOpener:
    """The agent side for vector `v`: its device key and its one trusted gateway key."""
    return dl.DownlinkOpener(
        device_id=v["device_id"],
        device_keys={v["device_key_id"]: keys.private_from_bytes(bytes.fromhex(v["device_private"]))},
        trusted_gateways={v["gateway_key_id"]: bytes.fromhex(v["gateway_public"])},
    )


def _downlink_self_check(doc: dict[str, Any]) -> None:
    """Refuse to write vectors the DownlinkOpener itself disagrees with."""
    for case in doc["rejections"]:
        try:
            got = downlink_opener(doc["vectors"][0]).open(
                bytes.fromhex(case["envelope"]), topic=case["topic"], now_ns=doc["now_ns"]
            )
        except dl.DownlinkRefusedError as exc:
            if exc.reason != case["reason"]:
                raise SystemExit(f"downlink rejection vector {case['name']!r}: got {exc.reason}") from None
        else:
            raise SystemExit(f"downlink rejection vector {case['name']!r}: opened {got!r}")


# --- suite 3: X25519 + ML-KEM-768 hybrid uplink, docs/PROTOCOL.md "Suite 3" ---------------------------
#
# cryptography's ML-KEM encapsulation draws its own randomness and takes no seed, so a rerun cannot make
# the same ciphertext. The vectors therefore pin one (ciphertext, shared secret) pair per case: the
# generator keeps the committed pair while it still decapsulates to the recorded secret under the case's
# seeded ML-KEM key, and draws a new one only when the file is missing or the key changed. What another
# implementation checks: decapsulation, the combiner (info and HKDF), the header encoding and the AEAD.

HYBRID_OUT = OUT.with_name("envelope_hybrid_v1.json")

HYBRID_CASES: list[dict[str, Any]] = [
    {"name": "hybrid-basic", "device_id": "dev-0001", "epoch": 1, "device_key_id": 1, "gateway_key_id": 1,
     "messages": [(0, "window"), (1, ""), (2, "68656c6c6f")]},
    {"name": "hybrid-wide-fields", "device_id": "Line_3.press-07", "epoch": (1 << 40) + 3,
     "device_key_id": 300, "gateway_key_id": 7,
     "messages": [((1 << 32) + 5, "window"), ((1 << 64) - 1, "ff")]},
]


def _kem_seed(name: str) -> bytes:
    return _secret(name + " kem d") + _secret(name + " kem z")  # FIPS 203's (d, z), 64 bytes


def _pinned_encapsulation(name: str, kem: Any) -> tuple[bytes, bytes]:
    """(shared secret, ciphertext) for case `name`: the committed pair if it still decapsulates."""
    try:
        old = json.loads(HYBRID_OUT.read_text())
        v = next(v for v in old["vectors"] if v["name"] == name)
        shared, ct = bytes.fromhex(v["kem_shared_secret"]), bytes.fromhex(v["kem_ciphertext"])
        if kem.decapsulate(ct) == shared:
            return shared, ct
    except (OSError, ValueError, KeyError, StopIteration):
        pass
    shared, ct = kem.public_key().encapsulate()
    return bytes(shared), bytes(ct)


def _hybrid_vector(case: dict[str, Any]) -> dict[str, Any]:
    name = case["name"]
    dev = keys.private_from_bytes(_secret(name + " device"))
    gw = keys.private_from_bytes(_secret(name + " gateway"))
    eph = keys.private_from_bytes(_secret(name + " ephemeral"))
    kem = keys.kem_private_from_bytes(_kem_seed(name))
    dev_pub, gw_pub, eph_pub = keys.public_bytes(dev), keys.public_bytes(gw), keys.public_bytes(eph)
    kem_pub = keys.kem_public_bytes(kem)
    shared, ct = _pinned_encapsulation(name, kem)
    gw_key = keys.public_from_bytes(gw_pub)
    dh_es, dh_ss = eph.exchange(gw_key), dev.exchange(gw_key)
    info = ev.hybrid_kdf_info(
        ephemeral_pub=eph_pub, device_pub=dev_pub, gateway_pub=gw_pub, kem_public=kem_pub, kem_ciphertext=ct,
        device_id=case["device_id"], epoch=case["epoch"], device_key_id=case["device_key_id"],
        gateway_key_id=case["gateway_key_id"],
    )
    messages = []
    for counter, body in case["messages"]:
        plaintext = _plaintext_window() if body == "window" else bytes.fromhex(body)
        sealer = Sealer(
            device_id=case["device_id"], device_key=dev, device_key_id=case["device_key_id"],
            gateway_public=gw_pub, gateway_key_id=case["gateway_key_id"], epoch=case["epoch"],
            ephemeral=eph, first_counter=counter, suite=suites.HYBRID, gateway_kem_public=kem_pub,
            kem_encapsulation=(shared, ct),
        )
        raw = sealer.seal(plaintext)
        env = envelope_pb2.Envelope.FromString(raw)
        messages.append({
            "counter": counter, "plaintext": plaintext.hex(), "nonce": ev.nonce(counter).hex(),
            "header": env.header.hex(), "ciphertext": env.ciphertext.hex(), "envelope": raw.hex(),
        })
    return {
        "name": name, "device_id": case["device_id"], "epoch": case["epoch"],
        "device_key_id": case["device_key_id"], "gateway_key_id": case["gateway_key_id"],
        "device_private": _secret(name + " device").hex(), "device_public": dev_pub.hex(),
        "gateway_private": _secret(name + " gateway").hex(), "gateway_public": gw_pub.hex(),
        "ephemeral_private": _secret(name + " ephemeral").hex(), "ephemeral_public": eph_pub.hex(),
        "kem_private_seed": _kem_seed(name).hex(), "kem_public": kem_pub.hex(),
        "kem_ciphertext": ct.hex(), "kem_shared_secret": shared.hex(),
        "kem_public_sha256": hashlib.sha256(kem_pub).hexdigest(),
        "kem_ciphertext_sha256": hashlib.sha256(ct).hexdigest(),
        "dh_es": dh_es.hex(), "dh_ss": dh_ss.hex(), "hkdf_info": info.hex(),
        "session_key": ev.hybrid_session_key(shared, dh_es, dh_ss, info).hex(), "messages": messages,
    }


def _hybrid_rejections(basic: dict[str, Any]) -> list[dict[str, Any]]:
    """Single-message refusals. Each names the gateway it meets: the device's registered minimum suite and
    the gateway's allow-list (wire numbers)."""
    m0 = bytes.fromhex(basic["messages"][0]["envelope"])
    ct = bytes.fromhex(basic["kem_ciphertext"])
    flipped_ct = ct[:500] + bytes((ct[500] ^ 0x01,)) + ct[501:]
    # The same device key and ephemeral sealing suite 1: what a downgraded agent would send.
    suite1 = Sealer(
        device_id=basic["device_id"],
        device_key=keys.private_from_bytes(bytes.fromhex(basic["device_private"])),
        device_key_id=basic["device_key_id"], gateway_public=bytes.fromhex(basic["gateway_public"]),
        gateway_key_id=basic["gateway_key_id"], epoch=basic["epoch"],
        ephemeral=keys.private_from_bytes(bytes.fromhex(basic["ephemeral_private"])),
    ).seal(bytes.fromhex(basic["messages"][0]["plaintext"]))
    both, pq_only, x_only = [1, 3], [3], [1]
    cases = {
        "suite 1 from a device registered for suite 3": (suite1, 3, both, "downgrade"),
        "relabelled suite 1, KEM ciphertext stripped": (
            _with_header(m0, suite=1, kem_ciphertext=b""), 3, both, "downgrade"),
        "suite 3 at a gateway allowing suite 1 only": (m0, 1, x_only, "suite_not_allowed"),
        "suite 1 at a gateway allowing suite 3 only": (suite1, 1, pq_only, "suite_not_allowed"),
        "suite 2 (the downlink's)": (_with_header(m0, suite=2), 1, both, "unsupported_version"),
        "KEM ciphertext bit flipped": (_with_header(m0, kem_ciphertext=flipped_ct), 3, both, "bad_auth"),
        "KEM ciphertext one byte short": (_with_header(m0, kem_ciphertext=ct[:-1]), 3, both, "malformed"),
        "KEM ciphertext missing": (_with_header(m0, kem_ciphertext=b""), 3, both, "malformed"),
        "KEM ciphertext on suite 1": (_with_header(suite1, kem_ciphertext=ct), 1, both, "malformed"),
        "tag bit flipped": (m0[:-1] + bytes((m0[-1] ^ 0x01,)), 3, both, "bad_auth"),
        "unknown gateway key id": (_with_header(m0, gateway_key_id=2), 3, both, "bad_auth"),
        "header over the suite-3 bound": (_with_header(m0, kem_ciphertext=ct + bytes(300)), 3, both,
                                          "malformed"),
    }
    return [{"name": k, "envelope": raw.hex(), "min_suite": floor, "suites_allowed": allowed, "reason": why}
            for k, (raw, floor, allowed, why) in cases.items()]


def hybrid_opener(v: dict[str, Any], *, min_suite: int = suites.HYBRID,
                  suites_allowed: list[int] | None = None) -> Opener:
    entry = KeyEntry(bytes.fromhex(v["device_public"]))
    registry = {v["device_id"]: DeviceKeys("active", {v["device_key_id"]: entry}, min_suite)}
    kid = v["gateway_key_id"]
    return Opener(gateway_keys={kid: keys.private_from_bytes(bytes.fromhex(v["gateway_private"]))},
                  gateway_kem_keys={kid: keys.kem_private_from_bytes(bytes.fromhex(v["kem_private_seed"]))},
                  lookup=registry.get, suites_allowed=suites_allowed)


def build_hybrid() -> dict[str, Any]:
    vectors = [_hybrid_vector(case) for case in HYBRID_CASES]
    doc = {
        "description": "sgw wire format v1, suite 3 (X25519 + ML-KEM-768 hybrid uplink) test vectors "
                       "(docs/PROTOCOL.md, 'Suite 3'). Byte strings are hex. The KEM ciphertext and shared "
                       "secret are recorded, not derived: ML-KEM encapsulation is randomized.",
        "suite": {"version": ev.VERSION, "suite": suites.HYBRID, "hkdf_salt": ev.HKDF_SALT.hex(),
                  "hkdf_label": ev.HYBRID_LABEL.hex(), "nonce_prefix": ev.NONCE_PREFIX.hex(),
                  "kem": "ML-KEM-768 (FIPS 203)", "kem_ciphertext_field": 10,
                  "max_header_bytes": ev.MAX_HYBRID_HEADER_BYTES},
        "now_ns": NOW_NS,
        "vectors": vectors,
        "rejections": _hybrid_rejections(vectors[0]),
    }
    for case in doc["rejections"]:
        opener = hybrid_opener(vectors[0], min_suite=case["min_suite"], suites_allowed=case["suites_allowed"])
        got = opener.open(bytes.fromhex(case["envelope"]), NOW_NS)
        if isinstance(got, Opened) or got.reason != case["reason"]:
            raise SystemExit(f"hybrid rejection vector {case['name']!r}: got {got!r}")
    return doc


OUTPUTS = ((OUT, build), (DOWNLINK_OUT, build_downlink), (HYBRID_OUT, build_hybrid))


def main() -> int:
    stale = []
    for path, make in OUTPUTS:
        text = render(make())
        if "--check" in sys.argv[1:]:
            if not (path.exists() and path.read_text() == text):
                stale.append(path)
                print(f"{path} is stale: run scripts/make_vectors.py")
            continue
        path.write_text(text)
        print(f"wrote {path}")
    if "--check" in sys.argv[1:] and not stale:
        print("vectors up to date")
    return 1 if stale else 0

if __name__ == "__main__":
    sys.exit(main())
