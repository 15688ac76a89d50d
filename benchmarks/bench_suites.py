#!/usr/bin/env python3
"""Suite 1 (X25519) against suite 3 (X25519 + ML-KEM-768) in one run: bytes per message, CPU per session
start and per message, on the device (seal) and the gateway (open).

Usage: python benchmarks/bench_suites.py [--quick]
Prints one JSON object. Times are microseconds, the best of several runs (the machine is shared: the
minimum is the least disturbed run, as timeit reports it). The message is one sealed 128x3 int16 window,
the agent's normal telemetry message. "session start" is what a new session costs once: on the device,
making the Sealer (an X25519 key pair and two exchanges; suite 3 adds one ML-KEM encapsulation); on the
gateway, opening a new session's first message (two exchanges, one with a cached static term; suite 3
adds one decapsulation). "per message" is a message of a session the gateway already holds.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Iterator
from typing import Any

import cryptography

# The same message and timer as the envelope benchmark, so the two read side by side.
from bench_envelope import NOW, plaintext
from bench_envelope import per_call_us as best_us
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey

from gateway.core import keys, suites
from gateway.core.session import DeviceKeys, KeyEntry, Opened, Opener, Sealer

DEVICE = "dev-0001"


def measure(suite: int, *, n: int, sessions: int, repeats: int) -> dict[str, Any]:
    pt = plaintext()
    gw, dev, kem = keys.generate(), keys.generate(), MLKEM768PrivateKey.generate()
    gw_pub, kem_pub = keys.public_bytes(gw), keys.kem_public_bytes(kem)
    registry = {DEVICE: DeviceKeys("active", {1: KeyEntry(keys.public_bytes(dev))})}
    epochs: Iterator[int] = iter(range(1, 1 << 62))

    def new_sealer() -> Sealer:
        return Sealer(device_id=DEVICE, device_key=dev, device_key_id=1, gateway_public=gw_pub,
                      gateway_key_id=1, epoch=next(epochs), suite=suite,
                      gateway_kem_public=kem_pub if suite == suites.HYBRID else None)

    def new_opener() -> Opener:
        return Opener(gateway_keys={1: gw}, gateway_kem_keys={1: kem}, lookup=registry.get)

    # Device: a session start, then messages.
    def session_starts(k: int) -> None:
        for _ in range(k):
            new_sealer()

    sealer = new_sealer()

    def seals(k: int) -> None:
        for _ in range(k):
            sealer.seal(pt)

    # Gateway: messages of a session it holds (sealed beforehand: counters must be fresh each run).
    opener = new_opener()
    first = sealer.seal(pt)
    got = opener.open(first, NOW)
    assert isinstance(got, Opened) and got.plaintext == pt
    batches = iter([[sealer.seal(pt) for _ in range(n)] for _ in range(repeats)])

    def opens(_k: int) -> None:
        for raw in next(batches):
            opener.open(raw, NOW)

    # Gateway: a new session's first message each time (ascending epochs, so none is stale).
    firsts = iter([new_sealer().seal(pt) for _ in range(sessions * repeats)])
    fresh_opener = new_opener()

    def new_session_opens(k: int) -> None:
        for _ in range(k):
            raw = next(firsts)
            assert isinstance(fresh_opener.open(raw, NOW), Opened)

    # Gateway: a forged new session (a stranger's ephemeral and, for suite 3, ciphertext; a bad tag):
    # what each such message costs before bad_auth, the denial-of-service price. Never moves state.
    forger = Sealer(device_id=DEVICE, device_key=keys.generate(), device_key_id=1, gateway_public=gw_pub,
                    gateway_key_id=1, epoch=1 << 61, suite=suite,
                    gateway_kem_public=kem_pub if suite == suites.HYBRID else None)
    forged = [forger.seal(pt) for _ in range(sessions)]

    def forged_opens(k: int) -> None:
        for raw in forged[:k]:
            fresh_opener.open(raw, NOW)

    sizes = [len(sealer.seal(pt)) for _ in range(16)]
    return {
        "suite": suites.NAMES[suite],
        "wire_suite": suite,
        "plaintext_bytes": len(pt),
        "envelope_bytes": round(sum(sizes) / len(sizes)),
        "overhead_bytes": round(sum(sizes) / len(sizes)) - len(pt),
        "device_session_start_us": best_us(session_starts, sessions, repeats),
        "device_seal_us": best_us(seals, n, repeats),
        "gateway_session_start_us": best_us(new_session_opens, sessions, repeats),
        "gateway_open_us": best_us(opens, n, repeats),
        "gateway_forged_session_us": best_us(forged_opens, sessions, repeats),
    }


def primitives(n: int, repeats: int) -> dict[str, float]:
    """The raw costs the suites add up from."""
    kem = MLKEM768PrivateKey.generate()
    pub = kem.public_key()
    _, ct = pub.encapsulate()
    a, b = keys.generate(), keys.generate().public_key()

    def encaps(k: int) -> None:
        for _ in range(k):
            pub.encapsulate()

    def decaps(k: int) -> None:
        for _ in range(k):
            kem.decapsulate(ct)

    def x25519(k: int) -> None:
        for _ in range(k):
            a.exchange(b)

    return {"mlkem768_encaps_us": best_us(encaps, n, repeats),
            "mlkem768_decaps_us": best_us(decaps, n, repeats),
            "x25519_exchange_us": best_us(x25519, n, repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny iteration counts (a smoke run)")
    args = parser.parse_args()
    n, sessions, repeats = (200, 20, 2) if args.quick else (50_000, 1000, 5)
    runs = {name: measure(number, n=n, sessions=sessions, repeats=repeats)
            for number, name in sorted(suites.NAMES.items())}
    one, three = runs["x25519"], runs["x25519-mlkem768"]
    result = {
        "suites": runs,
        "suite3_over_suite1": {
            "extra_bytes_per_message": three["envelope_bytes"] - one["envelope_bytes"],
            "bytes_ratio": round(three["envelope_bytes"] / one["envelope_bytes"], 2),
            **{k: round(three[k] / one[k], 2) for k in (
                "device_session_start_us", "device_seal_us", "gateway_session_start_us", "gateway_open_us",
                "gateway_forged_session_us")},
        },
        "primitives": primitives(max(50, sessions), repeats),
        "python": platform.python_version(),
        "cryptography": cryptography.__version__,
        "machine": platform.machine(),
        "n": n,
        "sessions": sessions,
        "repeats": repeats,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
