"""Static X25519 identities as raw 32-byte strings, the form stored in key files and the registry.

Randomness comes only from `cryptography` (the pure core may not touch `os`).
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

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
