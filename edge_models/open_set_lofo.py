"""How well can an open-set rule catch a fault it never saw? Leave one known fault out (no TensorFlow).

    python edge_models/open_set_lofo.py       # ~2 min on one core; prints JSON

The gear fault is the held-out test; choosing the `unknown` rule by its gear figure would tune the design
to it. This picks the rule on the known faults instead: for each known fault f, fit the rule on the other
four (training machines of fleet seed 101 and generator seed 101, as edge_models/train.py), calibrate its
threshold to call 1 % of those four faults' windows of the validation machines (fleet seed 202) far, and
measure how many of f's validation windows it calls far. Rules: the shipped per-class Mahalanobis
distance (gateway/inference/decision.py) and a k-nearest-neighbour distance (k = 10, 8,000 reference
windows). Features standardized as the classifier's (vib-v1+ord1).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import numpy as np

from gateway.inference import features
from gateway.sim import FAULTS, Generator
from gateway.sim.physical import Fleet

Dist = Callable[[np.ndarray], np.ndarray]
SHRINK = 0.1  # as edge_models/train.py


def _data(seed: int, machines: int, per_class: int, gen_per_class: int,
          stream: int) -> tuple[np.ndarray, np.ndarray]:
    x, y, _ = Fleet(seed, machines).dataset(range(machines), per_class, FAULTS, stream=stream)
    f = [features.extract_set(features.ORDER_SET, x)]
    ys = [y]
    if gen_per_class:
        xg, yg = Generator(seed).batch(gen_per_class * len(FAULTS))
        f.append(features.extract_set(features.ORDER_SET, xg))
        ys.append(yg)
    return np.concatenate(f), np.concatenate(ys)


def mahalanobis(z: np.ndarray, y: np.ndarray, classes: Sequence[int]) -> Dist:
    cents, whites = [], []
    for k in classes:
        zk = z[y == k]
        cov = np.cov(zk.T)
        cov = (1 - SHRINK) * cov + SHRINK * np.diag(np.diag(cov)) + 1e-6 * np.eye(len(cov))
        whites.append(np.linalg.cholesky(np.linalg.inv(cov)).T)
        cents.append(zk.mean(axis=0))
    w, c = np.stack(whites), np.stack(cents)

    def dist(a: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(a), 2000):
            white = np.einsum("kij,nkj->nki", w, a[i:i + 2000, None, :] - c[None])
            out.append(np.sqrt((white * white).mean(axis=2)).min(axis=1))
        return np.concatenate(out)
    return dist


def knn(z: np.ndarray, y: np.ndarray, classes: Sequence[int], k: int = 10) -> Dist:
    ref = z[np.isin(y, classes)]
    ref = ref[np.random.default_rng(0).permutation(len(ref))[:8000]]
    r2 = (ref * ref).sum(axis=1)

    def dist(a: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(a), 1000):
            b = a[i:i + 1000]
            d2 = (b * b).sum(axis=1)[:, None] + r2[None] - 2 * b @ ref.T
            out.append(np.sqrt(np.maximum(np.sort(d2, axis=1)[:, :k], 0)).mean(axis=1))
        return np.concatenate(out)
    return dist


def main() -> None:
    ftr, ytr = _data(101, 256, 24, 1500, stream=0)
    fva, yva = _data(202, 32, 40, 0, stream=1)
    mean, std = ftr.mean(axis=0), ftr.std(axis=0) + 1e-6
    ztr, zva = features.standardize(ftr, mean, std), features.standardize(fva, mean, std)
    faults = range(1, len(FAULTS))
    out: dict[str, dict[str, float]] = {}
    for name, rule in (("mahalanobis", mahalanobis), ("knn10", knn)):
        row = {}
        for f in faults:
            rest = [k for k in faults if k != f]
            dist = rule(ztr, ytr, rest)
            t = float(np.quantile(dist(zva[np.isin(yva, rest)]), 0.99))
            row[FAULTS[f]] = round(float((dist(zva[yva == f]) > t).mean()), 4)
        row["mean"] = round(float(np.mean(list(row.values()))), 4)
        out[name] = row
    print(json.dumps({"held_out_known_fault_called_far_at_1pct_budget": out}, indent=1))


if __name__ == "__main__":
    main()
