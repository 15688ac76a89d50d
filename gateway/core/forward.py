"""Forward secrecy once the gateway has answered (issue 17 part 3): the key schedule, sans-IO.

DESIGN CORE ONLY: the agent, the gateway and the wire (a header marker, the downlink `answer` body, the
device's ephemeral ML-KEM key in its session's first status) do not use this yet; docs/PROTOCOL.md
("Forward secrecy once the gateway has answered") says what is built and what is not.

A session starts on its 0-RTT key K0 (suite 1 or 3, `session.Sealer`). When the gateway has heard the
session it answers with an ephemeral X25519 key F (and, for suite 3, an ML-KEM-768 ciphertext
encapsulated to the device's ephemeral ML-KEM key for this session); both sides then move to

    K1 = HKDF-SHA256(ikm = ss_f || DH(f, E), salt = K0, info = FORWARD_LABEL || transcript)

which needs an ephemeral secret of each side (e or f; for suite 3 also dk_e): the static keys alone, of
the gateway and the device together, cannot recover it once the ephemerals are deleted. K0 as the salt
keeps everything K0 authenticated (device static, gateway static, the KEM to the gateway) in K1.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.core import envelope as ev
from gateway.core import keys, suites
from gateway.errors import ConfigError, RemoteError

FORWARD_LABEL = b"sgw/v1 forward key"


class ForwardRefusedError(RemoteError):
    """An answer (or a device's offer) that cannot give a forward key: fixed text, nothing secret."""

    def __init__(self, why: str) -> None:
        super().__init__("forward_refused", f"forward answer refused: {why}")


def transcript(*, device_id: str, epoch: int, ephemeral_pub: bytes, answer_pub: bytes,
               kem_public: bytes = b"", kem_ciphertext: bytes = b"") -> bytes:
    """FORWARD_LABEL || E || F || SHA-256(ek_e) || SHA-256(ct_f) || u8 len(id) || id || u64 epoch.
    For suite 1 the KEM fields are the SHA-256 of the empty string."""
    did = device_id.encode("ascii")
    return b"".join((
        FORWARD_LABEL, ephemeral_pub, answer_pub, hashlib.sha256(kem_public).digest(),
        hashlib.sha256(kem_ciphertext).digest(), len(did).to_bytes(1, "big"), did, epoch.to_bytes(8, "big"),
    ))


def forward_key(k0: bytes, dh_ee: bytes, kem_shared: bytes, info: bytes) -> bytes:
    if len(k0) != ev.KEY_BYTES:
        raise ValueError("K0 is a 32-byte session key")
    return HKDF(algorithm=SHA256(), length=ev.KEY_BYTES, salt=k0, info=info).derive(kem_shared + dh_ee)


@dataclass(frozen=True, slots=True)
class Answer:
    """What the gateway sends back (F, and ct_f for suite 3) and the key it moves to."""

    answer_pub: bytes
    kem_ciphertext: bytes
    key: bytes = field(repr=False)


def answer(*, k0: bytes, device_id: str, epoch: int, ephemeral_pub: bytes, kem_public: bytes = b"",
           ephemeral: X25519PrivateKey | None = None,
           kem_encapsulation: tuple[bytes, bytes] | None = None) -> Answer:
    """The gateway's side. `kem_public`: the device's ephemeral ML-KEM-768 key (suite 3), b"" for suite 1.
    `ephemeral` / `kem_encapsulation` ((secret, ciphertext)) only for deterministic vectors. The caller
    deletes `ephemeral` (the returned Answer holds no private key)."""
    f = ephemeral if ephemeral is not None else keys.generate()
    try:
        dh_ee = f.exchange(keys.public_from_bytes(ephemeral_pub))
    except (ValueError, ConfigError) as exc:  # a low-order or wrong-length E
        raise ForwardRefusedError("the session's ephemeral key is not usable") from exc
    shared, ciphertext = b"", b""
    if kem_public:
        try:
            pub = keys.kem_public_from_bytes(kem_public)
        except ConfigError as exc:
            raise ForwardRefusedError("the device's ephemeral ML-KEM key is not usable") from exc
        shared, ciphertext = kem_encapsulation or pub.encapsulate()
    f_pub = keys.public_bytes(f)
    info = transcript(device_id=device_id, epoch=epoch, ephemeral_pub=ephemeral_pub, answer_pub=f_pub,
                      kem_public=kem_public, kem_ciphertext=ciphertext)
    return Answer(f_pub, ciphertext, forward_key(k0, dh_ee, shared, info))


def accept(*, k0: bytes, device_id: str, epoch: int, ephemeral: X25519PrivateKey,
           kem_ephemeral: MLKEM768PrivateKey | None, answer_pub: bytes, kem_ciphertext: bytes) -> bytes:
    """The device's side: K1 from the gateway's answer. Refuses a suite mismatch (a KEM offer answered
    without a ciphertext is a downgrade of the forward phase), a wrong-length ciphertext or a low-order
    F. A tampered ciphertext yields another secret (ML-KEM rejects implicitly): the first message under
    K1 then fails to open, so the answer must be authenticated (it travels sealed on the downlink)."""
    if (kem_ephemeral is None) != (not kem_ciphertext):
        raise ForwardRefusedError("the answer's KEM part does not match the offer")
    shared = b""
    kem_public = b""
    if kem_ephemeral is not None:
        if len(kem_ciphertext) != suites.KEM_CIPHERTEXT_BYTES:
            raise ForwardRefusedError("an ML-KEM-768 ciphertext is 1088 bytes")
        shared = kem_ephemeral.decapsulate(kem_ciphertext)
        kem_public = keys.kem_public_bytes(kem_ephemeral)
    try:
        dh_ee = ephemeral.exchange(keys.public_from_bytes(answer_pub))
    except (ValueError, ConfigError) as exc:  # low-order or wrong-length F
        raise ForwardRefusedError("the answer's ephemeral key is not usable") from exc
    info = transcript(device_id=device_id, epoch=epoch, ephemeral_pub=keys.public_bytes(ephemeral),
                      answer_pub=answer_pub, kem_public=kem_public, kem_ciphertext=kem_ciphertext)
    return forward_key(k0, dh_ee, shared, info)
