#!/usr/bin/env python3
"""Per-window inference cost of both edge models at batch 1, 8, 32, 64, next to the copy-in floor.

Usage: python benchmarks/bench_inference.py [--quick] [--threads N] [--out FILE]
Prints one JSON object (also written to --out). Times are CPU microseconds per window (process CPU
time, not wall time: the machine is shared, and time spent descheduled is not a cost of inference), the
best of 25 short runs in which the four columns take turns, so all see the same load. Columns:

  copy_floor   set_tensor of a ready int8 batch only: the least any invoke can cost
  invoke       set_tensor + invoke + get_tensor on a ready int8 batch (the LiteRT part)
  features     numpy features + standardize + quantize of raw (n, 128, 3) windows (the Python part)
  predict      Model.predict on raw windows: everything the gateway or agent pays per window

The prefilter ships only as a batch-1 file (the agent scores one window at a time); at larger n,
`invoke` is the time of n batch-1 invokes and `predict` shows how Model.predict handles it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np

from gateway.inference import backends, load_model
from gateway.sim import Generator

BATCHES = (1, 8, 32, 64)


def per_window_us(cases: dict[str, Callable[[], object]], n_windows: int, budget_windows: int,
                  repeats: int) -> dict[str, float]:
    """Best per-window time of each case; the cases take turns so they see the same machine load."""
    loops = max(1, budget_windows // n_windows)
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(repeats):
        for name, run in cases.items():
            t0 = time.process_time_ns()
            for _ in range(loops):
                run()
            best[name] = min(best[name], (time.process_time_ns() - t0) / loops / n_windows / 1000)
    return {name: round(v, 3) for name, v in best.items()}


def bench_model(name: str, x: np.ndarray, threads: int, budget: int,
                repeats: int) -> dict[str, dict[str, float]]:
    model = load_model(name, accelerator="cpu", num_threads=threads)
    rows: dict[str, dict[str, float]] = {}
    for b in BATCHES:
        xb = x[:b]
        q = model.quantize(model.features(xb))
        # the runner for the variant Model.predict would use, or batch-1 invokes for a batch-1-only model
        variant = next((v for v in model.spec.variants if v.batch >= b), model.spec.variants[-1])
        runner = backends.InterpreterRunner(variant.read_verified(), variant.batch, threads)
        pad = np.zeros((variant.batch, q.shape[1]), dtype=q.dtype)
        pad[: min(b, variant.batch)] = q[: variant.batch]
        chunks = [pad] if variant.batch >= b else [q[i:i + variant.batch] for i in range(0, b, variant.batch)]

        def copy_in(chunks: list[np.ndarray] = chunks, runner: backends.InterpreterRunner = runner) -> None:
            for c in chunks:
                runner.copy_in(c)

        def invoke(chunks: list[np.ndarray] = chunks, runner: backends.InterpreterRunner = runner) -> None:
            for c in chunks:
                runner.run(c)

        cases = {
            "copy_floor": copy_in,
            "invoke": invoke,
            "features": lambda xb=xb: model.quantize(model.features(xb)),
            "predict": lambda xb=xb: model.predict(xb),
        }
        rows[f"b{b}"] = {"variant_batch": variant.batch, **per_window_us(cases, b, budget, repeats)}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    budget, repeats = (500, 3) if args.quick else (1_000, 25)

    x, _ = Generator(99).batch(64)
    result = {
        "benchmark": "inference", "unit": "CPU us per window", "num_threads": args.threads,
        "python": platform.python_version(), "machine": platform.machine(),
        "ai_edge_litert": metadata.version("ai-edge-litert"), "numpy": np.__version__,
        "models": {name: bench_model(name, x, args.threads, budget, repeats)
                   for name in ("prefilter", "classifier")},
    }
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
