#!/usr/bin/env python3
"""Cost of sealing and opening one 128x3 int16 window, next to a bare ChaCha20-Poly1305 call (the floor).

Usage: python benchmarks/bench_envelope.py [--quick]
Prints one JSON object; times are microseconds per message, the best of several runs (the machine is
shared: the minimum is the least disturbed run, as timeit reports it).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable

import cryptography
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from gateway.core import envelope as ev
from gateway.core import keys
from gateway.core.session import DeviceKeys, KeyEntry, Opened, Opener, Sealer
from gateway.pb import messages_pb2 as mpb

NOW = 1_800_000_000_000_000_000


def plaintext() -> bytes:
    samples = bytes(range(256)) * 3  # 128 x 3 int16 = 768 bytes
    window = mpb.TelemetryWindow(
        kind=mpb.SENSOR_KIND_VIBRATION, sample_rate_hz=1600.0, start_ns=NOW, shape=[128, 3],
        encoding=mpb.SAMPLE_ENCODING_INT16_SCALED, scale=0.001, samples=samples, prefilter_score=0.5,
        prefilter_version="vib-1", window_seq=1, reason=mpb.FORWARD_REASON_ANOMALY,
    )
    return mpb.Plaintext(sealed_at_ns=NOW, window=window).SerializeToString()


def per_call_us(run: Callable[[int], None], n: int, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        run(n)
        samples.append((time.perf_counter_ns() - t0) / n / 1000)
    return round(min(samples), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    args = parser.parse_args()
    n, repeats = (5_000, 3) if args.quick else (50_000, 5)

    pt = plaintext()
    gw, dev = keys.generate(), keys.generate()
    registry = {"dev-0001": DeviceKeys("active", {1: KeyEntry(keys.public_bytes(dev))})}

    def new_sealer(epoch: int) -> Sealer:
        return Sealer(device_id="dev-0001", device_key=dev, device_key_id=1,
                      gateway_public=keys.public_bytes(gw), gateway_key_id=1, epoch=epoch)

    sealer = new_sealer(1)
    header = sealer.header_bytes(0)
    aead = ChaCha20Poly1305(bytes(32))
    nonce = ev.nonce(0)
    bare_ct = aead.encrypt(nonce, pt, header)

    def bare_encrypt(k: int) -> None:
        for _ in range(k):
            aead.encrypt(nonce, pt, header)

    def bare_decrypt(k: int) -> None:
        for _ in range(k):
            aead.decrypt(nonce, bare_ct, header)

    def seal(k: int) -> None:
        for _ in range(k):
            sealer.seal(pt)

    # Opening needs fresh counters each run (replays are rejected), so seal them beforehand.
    opener = Opener(gateway_keys={1: gw}, lookup=registry.get)
    batches = [[sealer.seal(pt) for _ in range(n)] for _ in range(repeats)]
    runs = iter(batches)

    def open_all(k: int) -> None:
        for raw in next(runs):
            opener.open(raw, NOW)

    first = opener.open(batches[0][0], NOW)
    assert isinstance(first, Opened) and first.plaintext == pt
    opener.forget("dev-0001")
    # Counters above every opened one, so they pass the replay precheck and reach the AEAD; they fail
    # there and move no state, so every run can reuse them.
    forged = [raw[:-1] + bytes((raw[-1] ^ 1,)) for raw in (sealer.seal(pt) for _ in range(n))]

    def open_forged(k: int) -> None:
        for raw in forged[:k]:
            opener.open(raw, NOW)

    def replayed(k: int) -> None:
        for raw in batches[0][:k]:
            opener.open(raw, NOW)

    session_n = 200 if args.quick else 1000
    new_sessions = [new_sealer(e).seal(pt) for e in range(2, 2 + session_n * repeats)]
    fresh = iter(new_sessions)

    def open_new_session(k: int) -> None:
        for _ in range(k):
            opener.open(next(fresh), NOW)

    result = {
        "plaintext_bytes": len(pt),
        "envelope_bytes": len(batches[0][0]),
        "bare_encrypt_us": per_call_us(bare_encrypt, n, repeats),
        "bare_decrypt_us": per_call_us(bare_decrypt, n, repeats),
        "seal_us": per_call_us(seal, n, repeats),
        "open_us": per_call_us(open_all, n, repeats),
        "open_forged_tag_us": per_call_us(open_forged, n, repeats),
        "open_replay_us": per_call_us(replayed, n, repeats),
        "open_new_session_us": per_call_us(open_new_session, session_n, repeats),
        "python": platform.python_version(),
        "cryptography": cryptography.__version__,
        "machine": platform.machine(),
        "n": n,
        "repeats": repeats,
    }
    result["seal_over_floor"] = round(result["seal_us"] / result["bare_encrypt_us"], 2)
    result["open_over_floor"] = round(result["open_us"] / result["bare_decrypt_us"], 2)
    result["open_msgs_per_s_one_core"] = round(1e6 / result["open_us"])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
