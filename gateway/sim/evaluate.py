"""Machine-split evaluation: every figure is measured on machines whose windows nothing was fitted on.

For each machine of a `Fleet` the harness plays the agent's life cycle: commission on that machine's
own healthy windows (stream 0), then score fresh windows of every label (stream 1) against its
baseline. Nothing global is fitted on the evaluation fleet, so a fleet from a seed that development
never used is a set of machines the method never saw. Figures are pooled over machines (each machine
weighs the same) and the worst machine is reported beside them, so no machine hides in the average.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.core import baseline
from gateway.inference import decision, features
from gateway.sim.physical import LABELS, Fleet

Extractor = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]


def baseline_forward_rates(fleet: Fleet, machines: Sequence[int], *, n_commission: int = 300,
                           per_class: int = 60, target_rate: float = 0.01,
                           labels: Sequence[str] = LABELS, extract: Extractor = features.extract_for_baseline,
                           feature_set: str = features.ORDER_SET) -> dict[str, Any]:
    """Forwarded fraction per label after per-machine commissioning: mean and worst over machines."""
    rates: dict[str, list[float]] = {lab: [] for lab in labels}
    for mid in machines:
        healthy = extract(fleet.windows(mid, "healthy", n_commission, stream=0))
        b = baseline.fit(healthy, feature_set, target_rate=target_rate)
        for lab in labels:
            d = b.distance(extract(fleet.windows(mid, lab, per_class, stream=1)))
            rates[lab].append(float((d > b.threshold).mean()))
    return {"fleet_seed": fleet.seed, "machines": len(machines), "n_commission": n_commission,
            "per_class": per_class, "target_rate": target_rate,
            "forwarded": {lab: float(np.mean(v)) for lab, v in rates.items()},
            "per_machine": dict(rates),
            "worst_machine": {lab: float(np.min(v) if lab != "healthy" else np.max(v))
                              for lab, v in rates.items()}}


def classifier_figures(labels: Sequence[str], scores: npt.ArrayLike, y: npt.ArrayLike,
                       gates: Sequence[decision.Gate] | None = None) -> dict[str, Any]:
    """A classifier's answers (decision.decide over its scores) against true labels y (indices into LABELS):
    per known class recall (an `unknown` answer is a miss), balanced accuracy over the known classes, and
    the share of each true label answered `unknown` (for a held-out fault: the share not mislabelled)."""
    yy = np.asarray(y)
    best = np.asarray(decision.decide(labels, scores, gates))
    u = labels.index(decision.UNKNOWN) if decision.UNKNOWN in labels else -1
    recall = {lab: round(float((best[yy == k] == labels.index(lab)).mean()), 4)
              for k, lab in enumerate(LABELS) if lab in labels and (yy == k).any()}
    out: dict[str, Any] = {"n": int(yy.size), "per_class_recall": recall,
                           "balanced_accuracy": round(float(np.mean(list(recall.values()))), 4),
                           "unknown_rate": {lab: round(float((best[yy == k] == u).mean()), 4)
                                            for k, lab in enumerate(LABELS) if (yy == k).any()}}
    for k, lab in enumerate(LABELS):
        if lab not in labels and (yy == k).any():
            out[f"{lab}_answered"] = {name: round(float((best[yy == k] == j).mean()), 4)
                                      for j, name in enumerate(labels)}
    return out


def gated_scores(model: Any, fleet: Fleet, machines: Sequence[int], per_class: int = 60, *,
                 n_commission: int = 300, target_rate: float = 0.01,
                 stream: int = 1) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64],
                                           list[decision.Gate]]:
    """A classifier's (engine.Model) scores on fresh windows of every label of some fleet machines, the true
    labels (indices into LABELS) and each window's gate as in service: each machine commissioned on its own
    healthy windows, its baseline's verdict on the window (decision.gate_of)."""
    prep = model.spec.preprocessing
    zs, ys, gates = [], [], []
    for mid in machines:
        b = baseline.fit(features.extract_for_baseline(fleet.windows(mid, "healthy", n_commission, stream=0)),
                         features.ORDER_SET, target_rate=target_rate)
        for k, lab in enumerate(LABELS):
            x = fleet.windows(mid, lab, per_class, stream=stream)
            f = features.extract_for_baseline(x)
            zs.append(features.standardize(f, prep.mean, prep.std) if prep.features == features.ORDER_SET
                      else model.features(x))
            ys.append(np.full(per_class, k))
            verdict: list[decision.Gate] = ["anomaly" if far else "normal"
                                            for far in b.distance(f) > b.threshold]
            gates += verdict
    return model.score_features(np.concatenate(zs)), np.concatenate(ys).astype(np.int64), gates


def classifier_on_fleet(model: Any, fleet: Fleet, machines: Sequence[int], per_class: int = 60,
                        **kw: Any) -> dict[str, Any]:
    """classifier_figures twice: gated (as in service, see gated_scores) and alone (no gate: the
    classifier's own healthy class decides)."""
    scores, y, gates = gated_scores(model, fleet, machines, per_class, **kw)
    return {"fleet_seed": fleet.seed, "machines": len(machines), "per_class": per_class,
            "gated": classifier_figures(model.labels, scores, y, gates),
            "alone": classifier_figures(model.labels, scores, y)}
