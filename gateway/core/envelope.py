"""Wire format v1 primitives: size bounds, header and envelope bytes, key schedule, nonce.

Everything here is deterministic: keys and time come in as arguments. docs/PROTOCOL.md describes the
same construction byte by byte; the vectors in tests/vectors/envelope_v1.json pin it.
"""

from __future__ import annotations

import hashlib
import re

from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.core import suites

VERSION = 1
SUITE = suites.X25519  # the default suite: X25519 one-way (Noise K shape) + HKDF-SHA256 + ChaCha20-Poly1305
MAX_HEADER_BYTES = 256
# Suite 3's header adds its KEM ciphertext field (tag, 2-byte length, 1088 bytes) to the same 256 bytes.
KEM_FIELD_BYTES = 1 + 2 + suites.KEM_CIPHERTEXT_BYTES
MAX_HYBRID_HEADER_BYTES = MAX_HEADER_BYTES + KEM_FIELD_BYTES
EPHEMERAL_BYTES = 32
TAG_BYTES = 16
KEY_BYTES = 32
MAX_U64 = (1 << 64) - 1
MAX_U32 = (1 << 32) - 1

HKDF_SALT = b"sgw/v1"
HKDF_LABEL = b"sgw/v1 session key"
HYBRID_LABEL = b"sgw/v1 hybrid session key"
NONCE_PREFIX = b"\x00\x00\x00\x00"

# ASCII only: the id becomes an MQTT topic level, a certificate CN and a metric-free log field. The one
# home of the id alphabet (sgw's other names use it too, gateway/registry/ids.py); the rest of the device
# id rule (the reserved `sgw-` prefix) is ids.is_device_id's.
ID_CHARS = "A-Za-z0-9._-"
MAX_DEVICE_ID_LEN = 64
_DEVICE_ID = re.compile(f"[{ID_CHARS}]{{1,{MAX_DEVICE_ID_LEN}}}")
valid_device_id = _DEVICE_ID.fullmatch


def id_pattern(max_len: int) -> re.Pattern[str]:
    """1 to `max_len` characters of the id alphabet (gateway ids, share groups, serials)."""
    return re.compile(f"[{ID_CHARS}]{{1,{max_len}}}")

# Envelope field tags (field 1 header, field 2 ciphertext, both length-delimited).
_TAG_HEADER = 0x0A
_TAG_CIPHERTEXT = 0x12


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_length(raw: bytes, i: int, n: int) -> tuple[int, int]:
    """A minimal varint of at most 4 bytes at raw[i:]; (-1, 0) if absent, overlong or padded."""
    value = 0
    shift = 0
    while i < n and shift <= 21:
        b = raw[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            if b == 0 and shift:
                return -1, 0
            return value, i
        shift += 7
    return -1, 0


def encode_header_parts(
    *, device_id: str, epoch: int, ephemeral: bytes, device_key_id: int, gateway_key_id: int,
    suite: int = SUITE, kem_ciphertext: bytes = b"",
) -> tuple[bytes, bytes]:
    """The canonical Header bytes before and after the counter field (field order, zero fields omitted).

    The counter sits between them, so a sealer builds each header with two concatenations
    instead of a protobuf round trip. Equal to Header.SerializeToString() (tested). The downlink's
    DownlinkHeader shares fields 1-8 (with its own suite) and appends its sender after the tail.
    """
    did = device_id.encode("ascii")
    head = bytearray(b"\x08" + varint(VERSION) + b"\x10" + varint(suite))
    head += b"\x1a" + varint(len(did)) + did
    if epoch:
        head += b"\x20" + varint(epoch)
    tail = bytearray(b"\x32" + varint(len(ephemeral)) + ephemeral)
    if device_key_id:
        tail += b"\x38" + varint(device_key_id)
    if gateway_key_id:
        tail += b"\x40" + varint(gateway_key_id)
    if kem_ciphertext:  # suite 3 only (field 10)
        tail += b"\x52" + varint(len(kem_ciphertext)) + kem_ciphertext
    return bytes(head), bytes(tail)


def counter_field(counter: int) -> bytes:
    return b"\x28" + varint(counter) if counter else b""


def encode_envelope(header: bytes, ciphertext: bytes) -> bytes:
    return (
        bytes((_TAG_HEADER,)) + varint(len(header)) + header
        + bytes((_TAG_CIPHERTEXT,)) + varint(len(ciphertext)) + ciphertext
    )


def split_envelope(raw: bytes, max_header: int = MAX_HEADER_BYTES) -> tuple[bytes, bytes] | None:
    """(header, ciphertext) from a canonical Envelope, or None.

    Exactly field 1 then field 2 with minimal lengths and nothing else, so one message has one byte
    string. The header length is bounded (`max_header`: 256, or MAX_HYBRID_HEADER_BYTES where suite 3
    is served) before it is sliced out or parsed.
    """
    n = len(raw)
    if n < 2 or raw[0] != _TAG_HEADER:
        return None
    if raw[1] < 0x80:  # every realistic header is under 128 bytes: skip the varint loop
        hlen, i = raw[1], 2
    else:
        hlen, i = _read_length(raw, 1, n)
    if hlen <= 0 or hlen > max_header or i + hlen >= n:
        return None
    j = i + hlen
    if raw[j] != _TAG_CIPHERTEXT:
        return None
    clen, k = _read_length(raw, j + 1, n)
    if clen < TAG_BYTES or k + clen != n:
        return None
    return raw[i:j], raw[k:]


def nonce(counter: int) -> bytes:
    return NONCE_PREFIX + counter.to_bytes(8, "big")


def kdf_info(
    *, ephemeral_pub: bytes, device_pub: bytes, gateway_pub: bytes, device_id: str, epoch: int,
    device_key_id: int, gateway_key_id: int,
) -> bytes:
    did = device_id.encode("ascii")
    return b"".join((
        HKDF_LABEL, ephemeral_pub, device_pub, gateway_pub, len(did).to_bytes(1, "big"), did,
        epoch.to_bytes(8, "big"), device_key_id.to_bytes(4, "big"), gateway_key_id.to_bytes(4, "big"),
    ))


def session_key(dh_es: bytes, dh_ss: bytes, info: bytes) -> bytes:
    """HKDF-SHA256(ikm = DH(e, G) || DH(s, G), salt = "sgw/v1", info) -> 32 bytes."""
    return HKDF(algorithm=SHA256(), length=KEY_BYTES, salt=HKDF_SALT, info=info).derive(dh_es + dh_ss)


def hybrid_kdf_info(
    *, ephemeral_pub: bytes, device_pub: bytes, gateway_pub: bytes, kem_public: bytes, kem_ciphertext: bytes,
    device_id: str, epoch: int, device_key_id: int, gateway_key_id: int,
) -> bytes:
    """Suite 3's info: suite 1's fields under its own label, plus SHA-256 of the gateway's ML-KEM public key
    and of this session's KEM ciphertext (docs/PROTOCOL.md, "Suite 3")."""
    did = device_id.encode("ascii")
    return b"".join((
        HYBRID_LABEL, ephemeral_pub, device_pub, gateway_pub,
        hashlib.sha256(kem_public).digest(), hashlib.sha256(kem_ciphertext).digest(),
        len(did).to_bytes(1, "big"), did,
        epoch.to_bytes(8, "big"), device_key_id.to_bytes(4, "big"), gateway_key_id.to_bytes(4, "big"),
    ))


def hybrid_session_key(kem_shared: bytes, dh_es: bytes, dh_ss: bytes, info: bytes) -> bytes:
    """HKDF-SHA256(ikm = ML-KEM shared secret || DH(e, G) || DH(s, G), salt = "sgw/v1", info) -> 32 bytes.

    The approved (FIPS 203) secret comes first, as SP 800-56C rev. 2 wants for a hybrid Z' = Z || T and as
    TLS's X25519MLKEM768 orders it."""
    return HKDF(algorithm=SHA256(), length=KEY_BYTES, salt=HKDF_SALT, info=info).derive(
        kem_shared + dh_es + dh_ss)
