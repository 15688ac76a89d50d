"""The uplink's cipher suites: wire numbers, the names configuration uses, and their order of strength.

Wire value 2 is taken: the downlink (gateway -> device) uses it and nothing else tells the two directions
apart on the wire (docs/PROTOCOL.md, "Downlink"), so the hybrid uplink suite is 3. Configuration, the
registry's per-device minimum and the CLI use the names below; the header carries the number.
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.errors import ConfigError

X25519 = 1  # X25519 one-way (Noise K shape) + HKDF-SHA256 + ChaCha20-Poly1305
DOWNLINK = 2  # reserved: the downlink's suite (gateway/core/downlink.py), never an uplink suite
HYBRID = 3  # X25519 es+ss and ML-KEM-768 to the gateway KEM key, in HKDF-SHA256; ChaCha20-Poly1305

NAMES: dict[int, str] = {X25519: "x25519", HYBRID: "x25519-mlkem768"}
BY_NAME: dict[str, int] = {name: number for number, name in NAMES.items()}
UPLINK: frozenset[int] = frozenset(NAMES)
# Strength order for "no device below its recorded minimum". Explicit rather than the wire number, so a
# later suite need not take a higher number to count as stronger.
RANK: dict[int, int] = {X25519: 1, HYBRID: 2}

KEM_CIPHERTEXT_BYTES = 1088  # ML-KEM-768 (FIPS 203)
KEM_PUBLIC_BYTES = 1184
KEM_SEED_BYTES = 64  # the private key's stored form: FIPS 203's (d, z) seed
KEM_SHARED_BYTES = 32


def number(name: str, key: str) -> int:
    """The wire number of a suite name; a ConfigError naming `key` otherwise."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ConfigError(f"{key}: unknown suite {name!r} (known: {', '.join(sorted(BY_NAME))})") from None


def numbers(names: Iterable[str], key: str) -> frozenset[int]:
    out = frozenset(number(n, key) for n in names)
    if not out:
        raise ConfigError(f"{key}: at least one suite")
    return out


def below(suite: int, minimum: int) -> bool:
    """True when `suite` is weaker than `minimum` (an unknown minimum refuses everything)."""
    return RANK.get(suite, 0) < RANK.get(minimum, len(RANK) + 1)
