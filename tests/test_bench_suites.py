"""Smoke run of benchmarks/bench_suites.py --quick: it runs and its JSON is sane (never a time threshold:
the machine is shared). The byte figures are exact: suite 3 carries the 1088-byte KEM ciphertext."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_suites_quick() -> None:
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_suites.py"), "--quick"],
                         cwd=REPO, capture_output=True, text=True, timeout=120, check=True).stdout
    res = json.loads(out)
    one, three = res["suites"]["x25519"], res["suites"]["x25519-mlkem768"]
    assert one["plaintext_bytes"] == three["plaintext_bytes"] > 800
    # Field 10 (tag, 2-byte length, 1088 bytes) and one more byte of the envelope's header length.
    assert res["suite3_over_suite1"]["extra_bytes_per_message"] == 1088 + 3 + 1
    for run in (one, three):
        for key, value in run.items():
            if key.endswith("_us"):
                assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    assert all(v > 0 for v in res["primitives"].values())
