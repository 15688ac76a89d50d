"""A classifier's answer for one window: one of its learned classes, or `unknown`. Pure numpy.

The label set is closed: the manifest's learned labels (for the shipped classifier `FAULTS`) plus
UNKNOWN. A window is `unknown` when its features are far from every learned class: the smallest,
over classes, of the root-mean-square per-feature z-score against that class's mean and spread (a
diagonal Mahalanobis distance) exceeds a threshold calibrated on machines held out of training.
Why a feature distance and not the top softmax probability: on held-out machines the softmax is as
confident on a fault it never saw as on a known one (edge_models/README.md has the figures), because
a softmax only compares the learned classes with each other.

A model with an open-set rule returns one extra score column, "unknown": that distance divided by
the threshold (above 1.0 means unknown). `decide` and `confidence` read scores only, so every
consumer (results, metrics, Sparkplug, `sgw model evaluate`) applies the same rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

UNKNOWN = "unknown"
F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class OpenSet:
    """Per learned class: mean and whitener (W with W.T @ W = precision) of its standardized training
    features; the distance threshold."""

    centroids: F32  # (classes, features)
    whiteners: F32  # (classes, features, features)
    threshold: float

    @classmethod
    def from_manifest(cls, d: Mapping[str, Any], n_classes: int, n_features: int) -> OpenSet:
        c = np.asarray(d["centroids"], dtype=np.float32)
        w = np.asarray(d["whiteners"], dtype=np.float32)
        t = float(d["threshold"])
        if c.shape != (n_classes, n_features) or w.shape != (n_classes, n_features, n_features):
            raise ValueError(f"open set shaped {c.shape}/{w.shape}, expected {(n_classes, n_features)}")
        if not t > 0:
            raise ValueError("open set threshold must be positive")
        return cls(c, w, t)

    def distance(self, z: npt.ArrayLike) -> F32:
        """(n, features) standardized -> (n,) distance to the nearest learned class."""
        a = np.asarray(z, dtype=np.float32)
        diff = a[:, None, :] - self.centroids[None]  # (n, classes, features)
        white = np.einsum("kij,nkj->nki", self.whiteners, diff)
        return np.asarray(np.sqrt((white * white).mean(axis=2)).min(axis=1), dtype=np.float32)

    def unknown_score(self, z: npt.ArrayLike) -> F32:
        return np.asarray(self.distance(z) / self.threshold, dtype=np.float32)


def decide(labels: Sequence[str], scores: npt.ArrayLike) -> list[int]:
    """Index into labels per window: the top learned class, or UNKNOWN's index when its score is above 1."""
    s = np.asarray(scores, dtype=np.float32)
    if UNKNOWN not in labels or labels[-1] != UNKNOWN:
        return [int(b) for b in s.argmax(axis=1)]
    u = len(labels) - 1
    best = s[:, :u].argmax(axis=1)
    return [u if far else int(b) for b, far in zip(best, s[:, u] > 1.0, strict=True)]


def confidence(labels: Sequence[str], row: Sequence[float]) -> float:
    """The top learned class's probability (also for an unknown window: how sure the softmax alone was)."""
    n = len(labels) - 1 if labels and labels[-1] == UNKNOWN else len(labels)
    return float(max(row[:n])) if n else 0.0
