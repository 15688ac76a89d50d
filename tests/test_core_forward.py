"""Issue 17 part 3, the forward-secret phase's key schedule (gateway/core/forward.py): the committed vectors
(tests/vectors/forward_v1.json) recomputed from their inputs, both sides agree, what K1 depends on, and the
refusals. The wire that would carry the answer is not built (docs/PROTOCOL.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey

from gateway.core import forward, keys

DOC = json.loads((Path(__file__).parent / "vectors" / "forward_v1.json").read_text())


def _device(v: dict[str, Any]) -> tuple[Any, MLKEM768PrivateKey | None]:
    e = keys.private_from_bytes(bytes.fromhex(v["device_ephemeral_private"]))
    kem = (MLKEM768PrivateKey.from_seed_bytes(bytes.fromhex(v["device_kem_seed"]))
           if v["device_kem_seed"] else None)
    return e, kem


@pytest.mark.parametrize("v", DOC["cases"], ids=lambda v: v["name"])
def test_vectors_recompute_on_both_sides(v: dict[str, Any]) -> None:
    e, kem = _device(v)
    f = keys.private_from_bytes(bytes.fromhex(v["gateway_ephemeral_private"]))
    assert keys.public_bytes(e).hex() == v["device_ephemeral_public"]
    assert keys.public_bytes(f).hex() == v["answer_public"]
    k0 = bytes.fromhex(v["k0"])
    ct = bytes.fromhex(v["kem_ciphertext"])
    if kem is not None:
        assert keys.kem_public_bytes(kem).hex() == v["device_kem_public"]
        assert kem.decapsulate(ct).hex() == v["kem_shared"]  # the pinned pair is a real encapsulation
    ans = forward.answer(k0=k0, device_id=v["device_id"], epoch=v["epoch"],
                         ephemeral_pub=keys.public_bytes(e), kem_public=bytes.fromhex(v["device_kem_public"]),
                         ephemeral=f, kem_encapsulation=(bytes.fromhex(v["kem_shared"]), ct) if kem else None)
    k1 = forward.accept(k0=k0, device_id=v["device_id"], epoch=v["epoch"], ephemeral=e, kem_ephemeral=kem,
                        answer_pub=ans.answer_pub, kem_ciphertext=ans.kem_ciphertext)
    assert ans.key.hex() == k1.hex() == v["k1"]
    info = forward.transcript(device_id=v["device_id"], epoch=v["epoch"], ephemeral_pub=keys.public_bytes(e),
                              answer_pub=ans.answer_pub, kem_public=bytes.fromhex(v["device_kem_public"]),
                              kem_ciphertext=ct)
    assert info.hex() == v["info"]
    dh = bytes.fromhex(v["dh_ee"])
    assert forward.forward_key(k0, dh, bytes.fromhex(v["kem_shared"]), info).hex() == v["k1"]


def test_k1_depends_on_k0_and_each_ephemeral_secret_and_a_fresh_answer_differs() -> None:
    v = DOC["cases"][1]
    e, kem = _device(v)
    k0 = bytes.fromhex(v["k0"])
    common = {"device_id": v["device_id"], "epoch": v["epoch"], "ephemeral_pub": keys.public_bytes(e),
              "kem_public": bytes.fromhex(v["device_kem_public"])}
    a, b = forward.answer(k0=k0, **common), forward.answer(k0=k0, **common)  # real randomness
    assert a.key != b.key and a.answer_pub != b.answer_pub
    got = forward.accept(k0=k0, device_id=v["device_id"], epoch=v["epoch"], ephemeral=e, kem_ephemeral=kem,
                         answer_pub=a.answer_pub, kem_ciphertext=a.kem_ciphertext)
    assert got == a.key
    other_k0 = forward.accept(k0=bytes(32), device_id=v["device_id"], epoch=v["epoch"], ephemeral=e,
                              kem_ephemeral=kem, answer_pub=a.answer_pub, kem_ciphertext=a.kem_ciphertext)
    assert other_k0 != a.key
    flipped = bytes([a.kem_ciphertext[0] ^ 1]) + a.kem_ciphertext[1:]  # implicit rejection: another key
    assert forward.accept(k0=k0, device_id=v["device_id"], epoch=v["epoch"], ephemeral=e, kem_ephemeral=kem,
                          answer_pub=a.answer_pub, kem_ciphertext=flipped) != a.key
    next_epoch = forward.accept(k0=k0, device_id=v["device_id"], epoch=v["epoch"] + 1, ephemeral=e,
                                kem_ephemeral=kem, answer_pub=a.answer_pub, kem_ciphertext=a.kem_ciphertext)
    assert next_epoch != a.key


def test_refusals() -> None:
    v = DOC["cases"][1]
    e, kem = _device(v)
    k0 = bytes.fromhex(v["k0"])
    base = {"k0": k0, "device_id": v["device_id"], "epoch": v["epoch"], "ephemeral": e}
    a = forward.answer(k0=k0, device_id=v["device_id"], epoch=v["epoch"], ephemeral_pub=keys.public_bytes(e),
                       kem_public=bytes.fromhex(v["device_kem_public"]))
    with pytest.raises(forward.ForwardRefusedError, match="does not match"):  # KEM offer, no ciphertext
        forward.accept(**base, kem_ephemeral=kem, answer_pub=a.answer_pub, kem_ciphertext=b"")
    with pytest.raises(forward.ForwardRefusedError, match="1088"):
        forward.accept(**base, kem_ephemeral=kem, answer_pub=a.answer_pub, kem_ciphertext=b"x" * 1087)
    with pytest.raises(forward.ForwardRefusedError, match="not usable"):  # a low-order F
        forward.accept(**base, kem_ephemeral=kem, answer_pub=bytes(32), kem_ciphertext=a.kem_ciphertext)
    with pytest.raises(forward.ForwardRefusedError, match="not usable"):
        forward.answer(k0=k0, device_id="d", epoch=1, ephemeral_pub=bytes(32))
    with pytest.raises(forward.ForwardRefusedError, match="ML-KEM"):
        forward.answer(k0=k0, device_id="d", epoch=1, ephemeral_pub=keys.public_bytes(e), kem_public=b"x" * 5)
