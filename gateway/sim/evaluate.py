"""Machine-split evaluation: every figure is measured on machines whose windows nothing was fitted on.

For each machine of a `Fleet` the harness plays the agent's life cycle: commission on that machine's
own healthy windows (stream 0), then score fresh windows of every label (stream 1) against its
baseline. Nothing global is fitted on the evaluation fleet, so a fleet from a seed that development
never used is a set of machines the method never saw. Figures are pooled over machines (each machine
weighs the same) and the worst machine is reported beside them, so no machine hides in the average.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gateway.core import baseline
from gateway.inference import features
from gateway.sim.physical import LABELS, Fleet


def baseline_forward_rates(fleet: Fleet, machines: Sequence[int], *, n_commission: int = 300,
                           per_class: int = 60, target_rate: float = 0.01,
                           labels: Sequence[str] = LABELS) -> dict[str, Any]:
    """Forwarded fraction per label after per-machine commissioning: mean and worst over machines."""
    rates: dict[str, list[float]] = {lab: [] for lab in labels}
    for mid in machines:
        healthy = features.extract_for_baseline(fleet.windows(mid, "healthy", n_commission, stream=0))
        b = baseline.fit(healthy, features.ORDER_SET, target_rate=target_rate)
        for lab in labels:
            d = b.distance(features.extract_for_baseline(fleet.windows(mid, lab, per_class, stream=1)))
            rates[lab].append(float((d > b.threshold).mean()))
    return {"fleet_seed": fleet.seed, "machines": len(machines), "n_commission": n_commission,
            "per_class": per_class, "target_rate": target_rate,
            "forwarded": {lab: float(np.mean(v)) for lab, v in rates.items()},
            "worst_machine": {lab: float(np.min(v) if lab != "healthy" else np.max(v))
                              for lab, v in rates.items()}}
