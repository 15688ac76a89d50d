#!/usr/bin/env python3
"""Writes tests/vectors/envelope_v1.json: fixed keys and ephemerals, every intermediate value in hex.

Deterministic (keys are SHA-256 of fixed labels), so rerunning changes nothing; tests/test_core_vectors.py
checks the file against the code. Another implementation (C on a microcontroller, say) can check its
key schedule, nonce, header encoding and envelope bytes against it step by step.

Usage: python scripts/make_vectors.py [--check]
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from gateway.core import envelope as ev
from gateway.core import keys
from gateway.core.session import DeviceKeys, KeyEntry, Opened, Opener, Sealer
from gateway.pb import envelope_pb2, messages_pb2

OUT = Path(__file__).resolve().parent.parent / "tests" / "vectors" / "envelope_v1.json"
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


def main() -> int:
    text = render(build())
    if "--check" in sys.argv[1:]:
        same = OUT.exists() and OUT.read_text() == text
        print("vectors up to date" if same else f"{OUT} is stale: run scripts/make_vectors.py")
        return 0 if same else 1
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
