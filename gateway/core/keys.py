"""Static X25519 identities as raw 32-byte strings, the form stored in key files and the registry, and the
gateway's ML-KEM-768 key (suite 3).

Randomness comes only from `cryptography` (the pure core may not touch `os`).
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from gateway.core.suites import KEM_PUBLIC_BYTES, KEM_SEED_BYTES
from gateway.errors import ConfigError

KEY_BYTES = 32


def generate() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    if len(raw) != KEY_BYTES:
        raise ConfigError(f"an X25519 private key is {KEY_BYTES} raw bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def private_to_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def public_from_bytes(raw: bytes) -> X25519PublicKey:
    if len(raw) != KEY_BYTES:
        raise ConfigError(f"an X25519 public key is {KEY_BYTES} raw bytes, got {len(raw)}")
    return X25519PublicKey.from_public_bytes(raw)


def fingerprint(public: bytes) -> str:
    """A short public-key id that is safe to log and show (keys themselves never are logged)."""
    return hashlib.sha256(b"sgw/v1 fingerprint" + public).hexdigest()[:16]


# -- ML-KEM-768 (suite 3): the gateway's static KEM key. The private key is stored as its 64-byte seed. --

def generate_kem() -> MLKEM768PrivateKey:
    return MLKEM768PrivateKey.generate()


def kem_private_from_bytes(raw: bytes) -> MLKEM768PrivateKey:
    if len(raw) != KEM_SEED_BYTES:
        raise ConfigError(f"an ML-KEM-768 private key is a {KEM_SEED_BYTES}-byte seed, got {len(raw)} bytes")
    return MLKEM768PrivateKey.from_seed_bytes(raw)


def kem_private_to_bytes(key: MLKEM768PrivateKey) -> bytes:
    return key.private_bytes_raw()


def kem_public_bytes(key: MLKEM768PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def kem_public_from_bytes(raw: bytes) -> MLKEM768PublicKey:
    if len(raw) != KEM_PUBLIC_BYTES:
        raise ConfigError(f"an ML-KEM-768 public key is {KEM_PUBLIC_BYTES} raw bytes, got {len(raw)}")
    try:
        return MLKEM768PublicKey.from_public_bytes(raw)
    except ValueError as exc:  # FIPS 203's modulus check on the encoded key
        raise ConfigError("not a valid ML-KEM-768 public key") from exc
