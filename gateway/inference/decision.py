"""A classifier's answer for one window: one of its learned classes, or `unknown`. Pure numpy.

The label set is closed: the manifest's learned labels (for the shipped classifier `FAULTS`, healthy
first) plus UNKNOWN. Two questions are answered by the part that can answer them:

1. Is the window abnormal for its machine? A stateless model cannot know one machine's normal from
   another's fault (on held-out machines it calls a third of healthy windows a fault). An agent with a
   per-device baseline (gateway/agent/baseline.py) does know, and says so in every window: reason
   ANOMALY (over its calibrated threshold) or SUMMARY (a periodic window it judged normal).
   `gate_of` reads that; a window from an agent without a baseline, or one still commissioning (it
   scores every window 0.0), has no gate and the classifier's own healthy class decides.
2. Which fault? The classifier's best fault class, unless the window is far from every learned fault:
   then UNKNOWN. Far: the smallest, over fault classes, of the Mahalanobis distance to that class (its
   training mean and shrunk covariance, divided by sqrt(features)) exceeds a threshold calibrated on
   known-fault windows of machines held out of training. Why a feature distance and not the top
   softmax probability: the softmax is as sure of a fault it never saw as of a known one (it only
   compares the learned classes with each other); figures in edge_models/README.md.

A model with an open-set rule returns one extra score column, "unknown": that distance divided by the
threshold (above 1.0 means far). `decide` and `confidence` read only scores and gates, so every
consumer (results, metrics, Sparkplug, `sgw model evaluate`) applies the same rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

UNKNOWN = "unknown"
HEALTHY = "healthy"
# What the agent's per-device gate said about a window; None: no per-device gate judged it.
Gate = Literal["anomaly", "normal"] | None
BASELINE_PREFIX = "baseline-"  # the prefilter_version an agent gating with its per-device baseline sends
_REASON_ANOMALY, _REASON_SUMMARY = 1, 2  # pb.ForwardReason values; inference does not import the wire format
F32 = npt.NDArray[np.float32]


class WindowLike(Protocol):
    """What gate_of reads of a TelemetryWindow (read-only, so the protobuf's enum type fits)."""

    @property
    def reason(self) -> int: ...
    @property
    def prefilter_version(self) -> str: ...
    @property
    def prefilter_score(self) -> float: ...


def gate_of(window: WindowLike) -> Gate:
    """The per-device gate's verdict on a window, or None when no per-device baseline judged it."""
    if not window.prefilter_version.startswith(BASELINE_PREFIX):
        return None
    if window.reason == _REASON_ANOMALY:
        return "anomaly"
    # a commissioning agent scores every window exactly 0.0: those summaries were not judged
    if window.reason == _REASON_SUMMARY and window.prefilter_score != 0.0:
        return "normal"
    return None


class BaselineWindowLike(WindowLike, Protocol):
    @property
    def baseline_threshold(self) -> float: ...


def baseline_of(window: BaselineWindowLike) -> tuple[float, float]:
    """The agent's per-device baseline on a window: (distance to its machine's normal, forward threshold),
    or (0.0, 0.0) when no baseline judged it (gate_of is None). The threshold is 0.0 from an agent older
    than the field (wire field TelemetryWindow.baseline_threshold): the distance alone is still true."""
    if gate_of(window) is None:
        return 0.0, 0.0
    return float(window.prefilter_score), float(window.baseline_threshold)


@dataclass(frozen=True)
class OpenSet:
    """Per learned fault class: mean and whitener (W with W.T @ W = precision) of its standardized
    training features; the distance threshold."""

    classes: tuple[str, ...]
    centroids: F32  # (classes, features)
    whiteners: F32  # (classes, features, features)
    threshold: float

    @classmethod
    def from_manifest(cls, d: Mapping[str, Any], labels: Sequence[str], n_features: int) -> OpenSet:
        classes = tuple(str(c) for c in d["classes"])
        c = np.asarray(d["centroids"], dtype=np.float32)
        w = np.asarray(d["whiteners"], dtype=np.float32)
        t = float(d["threshold"])
        if not classes or not set(classes) <= set(labels):
            raise ValueError(f"open set classes {classes} are not among the labels {tuple(labels)}")
        k = len(classes)
        if c.shape != (k, n_features) or w.shape != (k, n_features, n_features):
            raise ValueError(f"open set shaped {c.shape}/{w.shape}, expected {(k, n_features)}")
        if not t > 0:
            raise ValueError("open set threshold must be positive")
        return cls(classes, c, w, t)

    def distance(self, z: npt.ArrayLike) -> F32:
        """(n, features) standardized -> (n,) distance to the nearest learned fault class."""
        a = np.asarray(z, dtype=np.float32)
        diff = a[:, None, :] - self.centroids[None]  # (n, classes, features)
        white = np.einsum("kij,nkj->nki", self.whiteners, diff)
        return np.asarray(np.sqrt((white * white).mean(axis=2)).min(axis=1), dtype=np.float32)

    def unknown_score(self, z: npt.ArrayLike) -> F32:
        return np.asarray(self.distance(z) / self.threshold, dtype=np.float32)


def decide(labels: Sequence[str], scores: npt.ArrayLike, gates: Sequence[Gate] | None = None) -> list[int]:
    """Index into labels per window (module docstring). Without "unknown" in labels: the plain argmax."""
    s = np.asarray(scores, dtype=np.float32)
    if not labels or labels[-1] != UNKNOWN:
        return [int(b) for b in s.argmax(axis=1)]
    u = len(labels) - 1
    h = labels.index(HEALTHY) if HEALTHY in labels[:u] else -1
    learned = s[:, :u]
    best = learned.argmax(axis=1)
    faults = learned.copy()
    if h >= 0:
        faults[:, h] = -np.inf
    best_fault = faults.argmax(axis=1)
    far = s[:, u] > 1.0
    out = []
    for i in range(len(s)):
        gate = gates[i] if gates is not None else None
        if gate == "normal":
            out.append(h if h >= 0 else int(best[i]))
            continue
        b = int(best_fault[i]) if gate == "anomaly" else int(best[i])
        out.append(u if b != h and far[i] else b)
    return out


def confidence(labels: Sequence[str], row: Sequence[float], best: int) -> float:
    """The classifier's probability of the answered class; for UNKNOWN, of its best fault class (how sure
    the softmax alone was of the wrong answer the open-set rule refused)."""
    u = len(labels) - 1 if labels and labels[-1] == UNKNOWN else len(labels)
    if best < u:
        return float(row[best])
    h = labels.index(HEALTHY) if HEALTHY in labels[:u] else -1
    rest = [v for j, v in enumerate(row[:u]) if j != h]
    return float(max(rest)) if rest else 0.0
