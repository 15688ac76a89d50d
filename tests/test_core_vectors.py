"""The committed vectors agree with the code, step by step, and the generator reproduces them exactly."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.core import envelope as ev
from gateway.core import keys, suites
from gateway.core.session import DeviceKeys, KeyEntry, Opened, Opener, Sealer
from gateway.pb import envelope_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
DOC: dict[str, Any] = json.loads((ROOT / "tests" / "vectors" / "envelope_v1.json").read_text())
h = bytes.fromhex


def _opener(v: dict[str, Any]) -> Opener:
    reg = {v["device_id"]: DeviceKeys("active", {v["device_key_id"]: KeyEntry(h(v["device_public"]))})}
    return Opener(gateway_keys={v["gateway_key_id"]: keys.private_from_bytes(h(v["gateway_private"]))},
                  lookup=reg.get)


def test_suite_constants() -> None:
    s = DOC["suite"]
    assert (s["version"], s["suite"]) == (ev.VERSION, ev.SUITE)
    assert h(s["hkdf_salt"]) == b"sgw/v1" and h(s["hkdf_label"]) == ev.HKDF_LABEL
    assert h(s["nonce_prefix"]) == bytes(4)


@pytest.mark.parametrize("v", DOC["vectors"], ids=lambda v: v["name"])
def test_key_schedule(v: dict[str, Any]) -> None:
    dev, gw, eph = (keys.private_from_bytes(h(v[k])) for k in ("device_private", "gateway_private",
                                                               "ephemeral_private"))
    assert keys.public_bytes(dev).hex() == v["device_public"]
    assert keys.public_bytes(gw).hex() == v["gateway_public"]
    assert keys.public_bytes(eph).hex() == v["ephemeral_public"]
    # Both sides of each Diffie-Hellman agree with the recorded value.
    assert eph.exchange(keys.public_from_bytes(h(v["gateway_public"]))).hex() == v["dh_es"]
    assert gw.exchange(keys.public_from_bytes(h(v["ephemeral_public"]))).hex() == v["dh_es"]
    assert gw.exchange(keys.public_from_bytes(h(v["device_public"]))).hex() == v["dh_ss"]
    info = ev.kdf_info(ephemeral_pub=h(v["ephemeral_public"]), device_pub=h(v["device_public"]),
                       gateway_pub=h(v["gateway_public"]), device_id=v["device_id"], epoch=v["epoch"],
                       device_key_id=v["device_key_id"], gateway_key_id=v["gateway_key_id"])
    assert info.hex() == v["hkdf_info"]
    assert ev.session_key(h(v["dh_es"]), h(v["dh_ss"]), info).hex() == v["session_key"]


@pytest.mark.parametrize("v", DOC["vectors"], ids=lambda v: v["name"])
def test_messages_seal_and_open_to_the_recorded_bytes(v: dict[str, Any]) -> None:
    opener = _opener(v)
    for m in v["messages"]:
        sealer = Sealer(device_id=v["device_id"], device_key=keys.private_from_bytes(h(v["device_private"])),
                        device_key_id=v["device_key_id"], gateway_public=h(v["gateway_public"]),
                        gateway_key_id=v["gateway_key_id"], epoch=v["epoch"],
                        ephemeral=keys.private_from_bytes(h(v["ephemeral_private"])),
                        first_counter=m["counter"])
        raw = sealer.seal(h(m["plaintext"]))
        assert raw.hex() == m["envelope"]
        assert ev.nonce(m["counter"]).hex() == m["nonce"]
        env = pb.Envelope.FromString(raw)
        assert (env.header.hex(), env.ciphertext.hex()) == (m["header"], m["ciphertext"])
        header = pb.Header.FromString(env.header)
        assert (header.device_id, header.epoch, header.counter) == (v["device_id"], v["epoch"], m["counter"])
        got = opener.open(raw, DOC["now_ns"])
        assert isinstance(got, Opened) and got.plaintext.hex() == m["plaintext"]


@pytest.mark.parametrize("case", DOC["rejections"], ids=lambda c: c["name"])
def test_rejection_vectors(case: dict[str, Any]) -> None:
    got = _opener(DOC["vectors"][0]).open(h(case["envelope"]), DOC["now_ns"])
    assert not isinstance(got, Opened) and got.reason == case["reason"]


def test_sequence_vector() -> None:
    opener = _opener(DOC["vectors"][0])
    for step in DOC["sequence"]:
        got = opener.open(h(step["envelope"]), DOC["now_ns"])
        assert ("accepted" if isinstance(got, Opened) else got.reason) == step["outcome"]


def test_generator_reproduces_the_file_exactly() -> None:
    spec = importlib.util.spec_from_file_location("make_vectors", ROOT / "scripts" / "make_vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render(module.build()) == (ROOT / "tests" / "vectors" / "envelope_v1.json").read_text()


# --- suite 3 (X25519 + ML-KEM-768), tests/vectors/envelope_hybrid_v1.json -----------------------------

HYBRID: dict[str, Any] = json.loads((ROOT / "tests" / "vectors" / "envelope_hybrid_v1.json").read_text())


def _hybrid_opener(v: dict[str, Any], min_suite: int = suites.HYBRID,
                   allowed: list[int] | None = None) -> Opener:
    reg = {v["device_id"]: DeviceKeys("active", {v["device_key_id"]: KeyEntry(h(v["device_public"]))},
                                      min_suite)}
    kid = v["gateway_key_id"]
    return Opener(gateway_keys={kid: keys.private_from_bytes(h(v["gateway_private"]))},
                  gateway_kem_keys={kid: keys.kem_private_from_bytes(h(v["kem_private_seed"]))},
                  lookup=reg.get, suites_allowed=allowed)


def test_hybrid_suite_constants() -> None:
    s = HYBRID["suite"]
    assert (s["version"], s["suite"]) == (ev.VERSION, suites.HYBRID) == (1, 3)
    assert h(s["hkdf_salt"]) == b"sgw/v1"
    assert h(s["hkdf_label"]) == ev.HYBRID_LABEL == b"sgw/v1 hybrid session key"
    assert s["max_header_bytes"] == ev.MAX_HYBRID_HEADER_BYTES == 256 + 1091


@pytest.mark.parametrize("v", HYBRID["vectors"], ids=lambda v: v["name"])
def test_hybrid_key_schedule(v: dict[str, Any]) -> None:
    kem = keys.kem_private_from_bytes(h(v["kem_private_seed"]))
    assert keys.kem_public_bytes(kem).hex() == v["kem_public"]
    # The recorded ciphertext decapsulates to the recorded secret (ML-KEM's encapsulation is randomized).
    assert kem.decapsulate(h(v["kem_ciphertext"])).hex() == v["kem_shared_secret"]
    assert hashlib.sha256(h(v["kem_public"])).hexdigest() == v["kem_public_sha256"]
    assert hashlib.sha256(h(v["kem_ciphertext"])).hexdigest() == v["kem_ciphertext_sha256"]
    gw = keys.private_from_bytes(h(v["gateway_private"]))
    assert gw.exchange(keys.public_from_bytes(h(v["ephemeral_public"]))).hex() == v["dh_es"]
    assert gw.exchange(keys.public_from_bytes(h(v["device_public"]))).hex() == v["dh_ss"]
    info = ev.hybrid_kdf_info(
        ephemeral_pub=h(v["ephemeral_public"]), device_pub=h(v["device_public"]),
        gateway_pub=h(v["gateway_public"]), kem_public=h(v["kem_public"]),
        kem_ciphertext=h(v["kem_ciphertext"]),
        device_id=v["device_id"], epoch=v["epoch"], device_key_id=v["device_key_id"],
        gateway_key_id=v["gateway_key_id"])
    assert info.hex() == v["hkdf_info"]
    # The layout, spelled out for another implementation: label, E, S, G, H(K_pub), H(ct), id, epoch, ids.
    did = v["device_id"].encode()
    assert info == (b"sgw/v1 hybrid session key" + h(v["ephemeral_public"]) + h(v["device_public"])
                    + h(v["gateway_public"]) + h(v["kem_public_sha256"]) + h(v["kem_ciphertext_sha256"])
                    + bytes((len(did),)) + did + v["epoch"].to_bytes(8, "big")
                    + v["device_key_id"].to_bytes(4, "big") + v["gateway_key_id"].to_bytes(4, "big"))
    key = ev.hybrid_session_key(h(v["kem_shared_secret"]), h(v["dh_es"]), h(v["dh_ss"]), info)
    assert key.hex() == v["session_key"]
    assert key == HKDF(algorithm=SHA256(), length=32, salt=b"sgw/v1", info=info).derive(
        h(v["kem_shared_secret"]) + h(v["dh_es"]) + h(v["dh_ss"]))


@pytest.mark.parametrize("v", HYBRID["vectors"], ids=lambda v: v["name"])
def test_hybrid_messages_seal_and_open_to_the_recorded_bytes(v: dict[str, Any]) -> None:
    opener = _hybrid_opener(v)
    for m in v["messages"]:
        sealer = Sealer(device_id=v["device_id"], device_key=keys.private_from_bytes(h(v["device_private"])),
                        device_key_id=v["device_key_id"], gateway_public=h(v["gateway_public"]),
                        gateway_key_id=v["gateway_key_id"], epoch=v["epoch"],
                        ephemeral=keys.private_from_bytes(h(v["ephemeral_private"])),
                        first_counter=m["counter"],
                        suite=suites.HYBRID, gateway_kem_public=h(v["kem_public"]),
                        kem_encapsulation=(h(v["kem_shared_secret"]), h(v["kem_ciphertext"])))
        raw = sealer.seal(h(m["plaintext"]))
        assert raw.hex() == m["envelope"]
        env = pb.Envelope.FromString(raw)
        assert (env.header.hex(), env.ciphertext.hex()) == (m["header"], m["ciphertext"])
        header = pb.Header.FromString(env.header)
        assert header.suite == 3 and header.kem_ciphertext.hex() == v["kem_ciphertext"]
        # The AEAD alone, with the recorded key: nonce from the counter, the header bytes as AAD.
        aead = ChaCha20Poly1305(h(v["session_key"]))
        assert aead.decrypt(h(m["nonce"]), env.ciphertext, env.header).hex() == m["plaintext"]
        got = opener.open(raw, HYBRID["now_ns"])
        assert isinstance(got, Opened) and got.plaintext.hex() == m["plaintext"]


@pytest.mark.parametrize("case", HYBRID["rejections"], ids=lambda c: c["name"])
def test_hybrid_rejection_vectors(case: dict[str, Any]) -> None:
    opener = _hybrid_opener(HYBRID["vectors"][0], case["min_suite"], case["suites_allowed"])
    got = opener.open(h(case["envelope"]), HYBRID["now_ns"])
    assert not isinstance(got, Opened) and got.reason == case["reason"]


def test_generator_reproduces_the_hybrid_file_exactly() -> None:
    spec = importlib.util.spec_from_file_location("make_vectors", ROOT / "scripts" / "make_vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render(module.build_hybrid()) == (ROOT / "tests" / "vectors" / "envelope_hybrid_v1.json"
                                                    ).read_text()
