"""Provisioning throughput: how long does a 10,000-device fleet take?

Measures, on a fresh temporary home:
  1. registry: rows + X25519 e2e key generation, all devices in one transaction (devices/s), and the
     same with one transaction per device (what N separate `sgw device add` runs pay for the registry);
  2. certificate issuance alone: P-256 key + signed certificate per device (us/device);
  3. end to end: `sgw device add --from CSV` (keys, certificates, bundles on disk, registry) (devices/s);
  4. the gateway's side: `snapshot()` of the whole registry and one `generation()` poll.

Usage: python benchmarks/bench_provision.py [--devices 10000] [--no-full] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from gateway.pki.ca import CertificateAuthority, new_x25519
from gateway.registry.store import NewDevice, Registry
from tests.support.cli import run_cli


def bench_registry(tmp: Path, n: int) -> dict[str, float]:
    reg = Registry.open(tmp / "bulk.db", create=True)
    t0 = time.perf_counter()
    rows = [NewDevice(f"d{i:06d}", "vibration", new_x25519()[1], f"{i:x}", 2**62) for i in range(n)]
    t_keys = time.perf_counter() - t0
    reg.add_devices(rows)
    t_bulk = time.perf_counter() - t0
    t1 = time.perf_counter()
    snap = reg.snapshot()
    t_snap = time.perf_counter() - t1
    assert len(snap) == n
    polls = 2000
    t2 = time.perf_counter()
    for _ in range(polls):
        reg.generation()
    t_poll = (time.perf_counter() - t2) / polls
    reg.close()

    single_n = min(n, 2000)
    reg = Registry.open(tmp / "single.db", create=True)
    t3 = time.perf_counter()
    for i in range(single_n):
        reg.add_device(f"s{i:06d}", "vibration", new_x25519()[1], f"{i:x}", 2**62)
    t_single = time.perf_counter() - t3
    reg.close()
    return {
        "registry_bulk_devices_per_s": n / t_bulk,
        "x25519_keygen_us": t_keys / n * 1e6,
        "registry_one_tx_per_device_devices_per_s": single_n / t_single,
        "snapshot_ms": t_snap * 1e3,
        "generation_poll_us": t_poll * 1e6,
    }


def bench_certs(n: int) -> dict[str, float]:
    ca = CertificateAuthority.create()
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(n):
            ca.issue(f"d{i:06d}")
        samples.append((time.perf_counter() - t0) / n * 1e6)
    return {"cert_issue_us": statistics.median(samples)}


def bench_full(tmp: Path, n: int) -> dict[str, float]:
    home = tmp / "home"
    rc, _, err = run_cli(["ca", "init", "--dir", str(home)])
    assert rc == 0, err
    csv = tmp / "devices.csv"
    csv.write_text("id\n" + "".join(f"dev-{i:06d}\n" for i in range(n)))
    t0 = time.perf_counter()
    rc, _, err = run_cli(["device", "add", "--from", str(csv), "--dir", str(home)])
    elapsed = time.perf_counter() - t0
    assert rc == 0, err
    t1 = time.perf_counter()
    rc, _, err = run_cli(["device", "add", "one-more", "--dir", str(home)])
    single = time.perf_counter() - t1
    assert rc == 0, err
    t2 = time.perf_counter()
    rc, _, err = run_cli(["device", "revoke", "dev-000000", "--dir", str(home)])
    revoke = time.perf_counter() - t2
    assert rc == 0, err
    return {"cli_csv_devices_per_s": n / elapsed, "cli_csv_total_s": elapsed,
            "cli_single_add_into_full_registry_ms": single * 1e3, "cli_revoke_ms": revoke * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--no-full", action="store_true", help="skip the end-to-end CLI run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results: dict[str, float] = {"devices": args.devices}
    with tempfile.TemporaryDirectory(prefix="sgw-bench-") as d:
        tmp = Path(d)
        results |= bench_registry(tmp, args.devices)
        results |= bench_certs(min(args.devices, 1000))
        if not args.no_full:
            results |= bench_full(tmp, args.devices)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for key, value in results.items():
            print(f"{key:45s} {value:12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
