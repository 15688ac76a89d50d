"""Writes tests/vectors/forward_v1.json: the forward-secret phase's key schedule (gateway/core/forward.py,
docs/PROTOCOL.md "Forward secrecy once the gateway has answered"), so another implementation can check
itself. Keys come from fixed seeds; ML-KEM encapsulation takes no seed, so its (ciphertext, secret) pair is
made once and pinned (the file is kept when it exists: run with --force to make a new pair).

Usage: .venv/bin/python scripts/make_forward_vectors.py [--force]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey

from gateway.core import forward, keys

OUT = Path(__file__).resolve().parent.parent / "tests" / "vectors" / "forward_v1.json"
CASES = [
    {"name": "forward-x25519", "device_id": "dev-0001", "epoch": 1, "kem": False},
    {"name": "forward-hybrid", "device_id": "Line_3.press-07", "epoch": (1 << 40) + 3, "kem": True},
]


def vector(case: dict[str, object], pinned: dict[str, str] | None) -> dict[str, object]:
    n = len(str(case["name"]))
    k0 = bytes((i * 7 + n) % 256 for i in range(32))
    e = keys.private_from_bytes(bytes((i + 100) % 256 for i in range(32)))
    f = keys.private_from_bytes(bytes((i + 200) % 256 for i in range(32)))
    kem_seed = bytes((i * 3 + 1) % 256 for i in range(64))
    kem = MLKEM768PrivateKey.from_seed_bytes(kem_seed) if case["kem"] else None
    kem_public = keys.kem_public_bytes(kem) if kem is not None else b""
    encapsulation = None
    if kem is not None:
        if pinned is not None:
            encapsulation = (bytes.fromhex(pinned["kem_shared"]), bytes.fromhex(pinned["kem_ciphertext"]))
        else:
            encapsulation = kem.public_key().encapsulate()
    device_id, epoch = str(case["device_id"]), int(case["epoch"])  # type: ignore[call-overload]
    ans = forward.answer(k0=k0, device_id=device_id, epoch=epoch, ephemeral_pub=keys.public_bytes(e),
                         kem_public=kem_public, ephemeral=f, kem_encapsulation=encapsulation)
    k1 = forward.accept(k0=k0, device_id=device_id, epoch=epoch, ephemeral=e, kem_ephemeral=kem,
                        answer_pub=ans.answer_pub, kem_ciphertext=ans.kem_ciphertext)
    if k1 != ans.key:
        raise SystemExit("the two sides disagree: not writing vectors")
    info = forward.transcript(device_id=device_id, epoch=epoch, ephemeral_pub=keys.public_bytes(e),
                              answer_pub=ans.answer_pub, kem_public=kem_public,
                              kem_ciphertext=ans.kem_ciphertext)
    return {
        "name": case["name"], "device_id": device_id, "epoch": epoch, "k0": k0.hex(),
        "device_ephemeral_private": e.private_bytes_raw().hex(),
        "device_ephemeral_public": keys.public_bytes(e).hex(),
        "gateway_ephemeral_private": f.private_bytes_raw().hex(), "answer_public": ans.answer_pub.hex(),
        "device_kem_seed": kem_seed.hex() if kem is not None else "", "device_kem_public": kem_public.hex(),
        "kem_ciphertext": ans.kem_ciphertext.hex(),
        "kem_shared": encapsulation[0].hex() if encapsulation else "",
        "dh_ee": e.exchange(keys.public_from_bytes(ans.answer_pub)).hex(), "info": info.hex(), "k1": k1.hex(),
    }


def main() -> int:
    old = {} if "--force" in sys.argv or not OUT.exists() else {
        v["name"]: v for v in json.loads(OUT.read_text())["cases"]}
    doc = {
        "description": "sgw forward-secret phase (issue 17 part 3): K1 = HKDF-SHA256(ikm = kem_shared || "
                       "dh_ee, salt = k0, info); info = 'sgw/v1 forward key' || E || F || SHA-256(ek_e) || "
                       "SHA-256(ct_f) || u8 len(id) || id || u64 epoch (KEM fields: SHA-256 of empty for "
                       "suite 1). The key schedule only: the wire carrying F, ct_f and ek_e is not built.",
        "cases": [vector(c, old.get(str(c["name"])) if c["kem"] else None) for c in CASES],
    }
    OUT.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
