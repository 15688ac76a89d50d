"""A model set judged on labelled recordings as in service: `sgw model evaluate` and the report step of
`sgw model train`.

Per machine: commission a per-device baseline (gateway/core/baseline.py) on its first `commission`
healthy windows in file order, then judge every later window of it against that baseline (forwarded
or not), and classify every window with the manifest's classifier, gated by the baseline's verdict where
it judged (gateway/inference/decision.py), as the gateway does with a commissioned agent's windows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gateway.core import baseline
from gateway.errors import LocalError
from gateway.inference import features
from gateway.inference.dataset import Dataset
from gateway.inference.decision import UNKNOWN, Gate, decide
from gateway.inference.engine import load_model


def report(ds: Dataset, *, commission: int, target: float, manifest: Path | None) -> dict[str, Any]:
    if commission < 20:
        raise LocalError("--commission: must be at least 20 windows")
    fwd: dict[str, list[bool]] = {}
    skipped: list[str] = []
    judged = np.zeros(len(ds.labels), dtype=bool)
    gates: list[Gate] = [None] * len(ds.labels)  # as in service: the machine's baseline says normal or fault
    for mid in sorted(set(ds.machine_ids.tolist())):
        idx = np.nonzero(ds.machine_ids == mid)[0]
        healthy = idx[ds.labels[idx] == "healthy"]
        if healthy.size < commission:
            skipped.append(mid)
            continue
        learn = healthy[:commission]
        rest = idx[idx > learn[-1]]
        b = baseline.fit(features.extract_for_baseline(ds.windows[learn]), features.ORDER_SET,
                         target_rate=target)
        d = b.distance(features.extract_for_baseline(ds.windows[rest])) if rest.size else np.zeros(0)
        for i, lab, flag in zip(rest, ds.labels[rest], d > b.threshold, strict=True):
            fwd.setdefault(str(lab), []).append(bool(flag))
            gates[i] = "anomaly" if flag else "normal"
        judged[rest] = True
    clf = load_model("classifier", manifest=manifest, accelerator="cpu")
    names = list(clf.labels)  # its learned classes, then "unknown" if it has an open-set rule
    # the classifier's labels first in its order, then labels it does not know
    rows = sorted(set(ds.labels.tolist()),
                  key=lambda s: (s not in names, names.index(s) if s in names else 0, s))
    pred = np.asarray(decide(names, clf.predict(ds.windows), gates))
    confusion = {r: {c: int(((ds.labels == r) & (pred == k)).sum()) for k, c in enumerate(names)}
                 for r in rows}
    # an `unknown` answer counts as a miss for a known class, and as right for a label it never learned
    recall = {r: confusion[r][r] / max(1, sum(confusion[r].values())) for r in rows
              if r in names and r != UNKNOWN}
    unknown_rate = {r: confusion[r].get(UNKNOWN, 0) / max(1, sum(confusion[r].values())) for r in rows}
    return {"data_windows": len(ds.labels), "machines": len(set(ds.machine_ids.tolist())),
            "machines_skipped_too_few_healthy": skipped, "commission_windows": commission, "target": target,
            "judged_windows": int(judged.sum()),
            "forwarded": {lab: float(np.mean(v)) for lab, v in sorted(fwd.items())},
            "classifier": {"labels": names, "per_class_recall": recall,
                           "balanced_accuracy": float(np.mean(list(recall.values()))) if recall else None,
                           "unknown_rate": unknown_rate, "confusion": confusion}}
