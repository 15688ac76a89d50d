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
from gateway.inference import features
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
