"""Generalisation report for the per-device baseline on held-out fleets (figures for README / PERFORMANCE).

    python edge_models/fleet_report.py            # ~2 min on one core; prints JSON

Every fleet seed here is one that development never used (dev used 13). Splits: all 64 machines; by
sensor range; by the width of the machine's speed range; with 4x sensor noise; by commissioning length;
and the v1 features alone (fixed-Hz bands, no order features) to show what the order features add.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from gateway.inference import features
from gateway.sim.evaluate import baseline_forward_rates
from gateway.sim.physical import LABELS, Fleet

SEED = 777_013


def _split(r: dict, keep: list[bool]) -> dict[str, float]:
    return {lab: round(float(np.mean([v for v, k in zip(r["per_machine"][lab], keep, strict=True) if k])), 4)
            for lab in LABELS}


def _rounded(r: dict) -> dict[str, float]:
    return {k: round(v, 4) for k, v in r["forwarded"].items()}


def main() -> None:
    fleet = Fleet(SEED, 64)
    out: dict[str, object] = {}
    r = baseline_forward_rates(fleet, range(64))
    out["all_64"] = {k: round(v, 4) for k, v in r["forwarded"].items()}
    out["worst_machine"] = {k: round(v, 4) for k, v in r["worst_machine"].items()}
    ms = fleet.machines
    out["range_4g"] = _split(r, [m.range_g == 4.0 for m in ms])
    out["range_16g"] = _split(r, [m.range_g == 16.0 for m in ms])
    span = [m.rpm_hi - m.rpm_lo for m in ms]
    out["speed_span_under_1000rpm"] = _split(r, [s < 1000 for s in span])
    out["speed_span_over_1500rpm"] = _split(r, [s > 1500 for s in span])
    noisy = Fleet(SEED, 16)
    noisy.machines = [dataclasses.replace(m, white_g=4 * m.white_g, pink_g=4 * m.pink_g)
                      for m in noisy.machines]
    out["noise_x4_16"] = _rounded(baseline_forward_rates(noisy, range(16)))
    for n in (120, 600):
        q = baseline_forward_rates(Fleet(SEED, 16), range(16), n_commission=n)
        out[f"commission_{n}_16"] = {k: round(v, 4) for k, v in q["forwarded"].items()}
    out["commission_300_16"] = _rounded(baseline_forward_rates(Fleet(SEED, 16), range(16)))
    v1 = baseline_forward_rates(Fleet(SEED, 16), range(16), extract=features.extract, feature_set="vib-v1")
    out["features_v1_only_16"] = {k: round(v, 4) for k, v in v1["forwarded"].items()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
