"""The committed vectors agree with the code, step by step, and the generator reproduces them exactly."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.core import envelope as ev
from gateway.core import keys
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
