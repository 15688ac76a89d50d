"""Generalisation report for the per-device baseline on held-out fleets (figures for README / PERFORMANCE).

    python edge_models/fleet_report.py                     # ~3 min on one core; prints JSON
    python edge_models/fleet_report.py --only classifier   # the classifier's figures alone, ~1 min

Every fleet seed here is one that development never used (dev used 13). Splits: all 64 machines; by
sensor range; by the width of the machine's speed range; with 4x sensor noise; by commissioning length;
and the v1 features alone (fixed-Hz bands, no order features) to show what the order features add.

Classifier (issue 13 part 3): the shipped int8 classifier with its `unknown` rule on all 64 machines of
the held-out fleet and on the old generator's held-out seed 777001, and the trade-off of the unknown
rule: thresholds at other budgets (share of known windows of the calibration machines, fleet seed 202,
called unknown), against the alternative of thresholding the top softmax probability.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np

from gateway.inference import features, load_model
from gateway.sim import FAULTS, Generator
from gateway.sim.evaluate import baseline_forward_rates, classifier_figures, gated_scores
from gateway.sim.physical import LABELS, Fleet

SEED = 777_013
GEN_SEED = 777_001  # the old generator's held-out seed (tests/test_models_quality.py)
CAL_SEED = 202  # the classifier's calibration machines (edge_models/train.py VAL_SEED)
BUDGETS = (0.01, 0.02, 0.05, 0.10)


def _split(r: dict, keep: list[bool]) -> dict[str, float]:
    return {lab: round(float(np.mean([v for v, k in zip(r["per_machine"][lab], keep, strict=True) if k])), 4)
            for lab in LABELS}


def _rounded(r: dict) -> dict[str, float]:
    return {k: round(v, 4) for k, v in r["forwarded"].items()}


def classifier_report() -> dict[str, object]:
    clf = load_model("classifier", accelerator="cpu")
    if clf.open_set is None:
        raise SystemExit("the classifier in the manifest has no open-set rule")
    scores, y, gates = gated_scores(clf, Fleet(SEED, 64), range(64), 60)
    xg, yg = Generator(GEN_SEED).batch(500 * len(FAULTS))
    out: dict[str, object] = {
        "fleet_64_gated": classifier_figures(clf.labels, scores, y, gates),
        "fleet_64_alone": classifier_figures(clf.labels, scores, y),
        "generator_alone": {"seed": GEN_SEED, **classifier_figures(clf.labels, clf.predict(xg), yg)}}
    # trade-off: the unknown threshold at other budgets (share of known-fault windows of the calibration
    # machines called unknown), against a rule on the top fault probability at the same budgets
    xc, _, _ = Fleet(CAL_SEED, 32).dataset(range(32), 40, FAULTS[1:])
    xc = np.concatenate([xc, Generator(CAL_SEED).batch(500 * (len(FAULTS) - 1), list(FAULTS[1:]))[0]])
    zc = clf.features(xc)
    dc, pc = clf.open_set.distance(zc), clf.predict_features(zc)
    dt = scores[:, -1] * clf.open_set.threshold
    rows = []
    for budget in BUDGETS:
        soft = ("softmax", -pc[:, 1:].max(axis=1), -scores[:, 1:-1].max(axis=1))
        for rule, cal, test in (("distance", dc, dt), soft):
            t = float(np.quantile(cal, 1.0 - budget))
            s = np.concatenate([scores[:, :-1], (test > t)[:, None] * 2.0], axis=1)  # > 1: far
            f = classifier_figures(clf.labels, s, y, gates)
            rows.append({"rule": rule, "budget": budget, "balanced_accuracy": f["balanced_accuracy"],
                         "gear_unknown": f["unknown_rate"]["gear"],
                         "healthy_unknown": f["unknown_rate"]["healthy"],
                         "faults_unknown": round(float(np.mean([f["unknown_rate"][k]
                                                                 for k in FAULTS[1:]])), 4)})
    out["tradeoff_fleet_64_gated"] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("baseline", "classifier"), default=None)
    args = ap.parse_args()
    out: dict[str, object] = {}
    if args.only != "baseline":
        out["classifier"] = classifier_report()
    if args.only == "classifier":
        print(json.dumps(out, indent=1))
        return
    fleet = Fleet(SEED, 64)
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
