"""A device's learned normal: mean and shrunk covariance of its healthy features, and a forward threshold.

Pure math (numpy only): the agent collects its own machine's windows while commissioning, `fit` turns
their feature vectors into a Baseline, and `distance` scores each later window. A window is forwarded
when its distance is above `threshold`.

Why per device: one machine's normal 1x is another's imbalance, so a stateless global model cannot
tell them apart (issue 13). Why Mahalanobis with shrinkage: with a few hundred windows and ~50
features the sample covariance is noisy; shrinking it toward its diagonal keeps the inverse stable,
and the distance still weighs each direction by how much that machine's healthy windows vary in it
(a machine that runs at many speeds varies a lot in its low bands, so a speed change is not an
anomaly there, while its impulsiveness features stay tight).

Why the threshold comes from out-of-fold distances: distances of the windows a mean was fitted on are
optimistically small. Splitting the commissioning windows in k folds and scoring each fold with a
baseline fitted on the others gives distances as a new healthy window would see them, and all
windows count for the quantile at the target false-forward rate.

Serialised form (`to_bytes` / `from_bytes`): a JSON header line with format, version, feature set,
dimension, threshold and the sha256 of the float64 payload, then the payload (mean, then the inverse
covariance, little-endian). Anything that does not match is refused with a BaselineError.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FORMAT = "sgw-baseline"
VERSION = 1
F64 = npt.NDArray[np.float64]


class BaselineError(ValueError):
    """A baseline that cannot be fitted or loaded; the message says why."""


@dataclass(frozen=True)
class Baseline:
    mean: F64
    precision: F64  # inverse of the shrunk covariance
    threshold: float
    feature_set: str
    n_windows: int
    target_rate: float

    def distance(self, feats: npt.ArrayLike) -> F64:
        """Mahalanobis distance of each row of feats (n, d) (or one vector) to the healthy mean."""
        f = np.atleast_2d(np.asarray(feats, dtype=np.float64))
        if f.shape[1] != self.mean.size:
            raise BaselineError(f"{f.shape[1]} features but the baseline has {self.mean.size}")
        d = f - self.mean
        return np.asarray(np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, self.precision, d), 0.0)))

    def to_bytes(self) -> bytes:
        payload = np.concatenate([self.mean, self.precision.ravel()]).astype("<f8").tobytes()
        head = {"format": FORMAT, "version": VERSION, "feature_set": self.feature_set,
                "dim": int(self.mean.size),
                "threshold": float(self.threshold), "n_windows": int(self.n_windows),
                "target_rate": float(self.target_rate), "sha256": hashlib.sha256(payload).hexdigest()}
        return json.dumps(head, sort_keys=True).encode() + b"\n" + payload


def from_bytes(blob: bytes, feature_set: str) -> Baseline:
    """Parse and verify a serialised baseline; BaselineError names what is wrong."""
    nl = blob.find(b"\n")
    if nl < 0 or nl > 4096:
        raise BaselineError("no header line")
    try:
        head = json.loads(blob[:nl])
    except ValueError as exc:
        raise BaselineError(f"header is not JSON ({exc})") from None
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise BaselineError("not an sgw baseline")
    if head.get("version") != VERSION:
        raise BaselineError(f"version {head.get('version')!r}, this agent reads {VERSION}")
    if head.get("feature_set") != feature_set:
        raise BaselineError(f"fitted on features {head.get('feature_set')!r}, the model uses {feature_set!r}")
    dim = head.get("dim")
    if not isinstance(dim, int) or not 0 < dim <= 1024:
        raise BaselineError(f"bad dimension {dim!r}")
    payload = blob[nl + 1:]
    if len(payload) != 8 * (dim + dim * dim):
        raise BaselineError(f"payload is {len(payload)} bytes, expected {8 * (dim + dim * dim)}")
    if hashlib.sha256(payload).hexdigest() != head.get("sha256"):
        raise BaselineError("checksum mismatch")
    v = np.frombuffer(payload, dtype="<f8").astype(np.float64)
    threshold = head.get("threshold")
    if not isinstance(threshold, float) or not np.isfinite(threshold) or not np.isfinite(v).all():
        raise BaselineError("non-finite values")
    return Baseline(mean=v[:dim].copy(), precision=v[dim:].reshape(dim, dim).copy(), threshold=threshold,
                    feature_set=feature_set, n_windows=int(head.get("n_windows", 0)),
                    target_rate=float(head.get("target_rate", 0.0)))


def _moments(f: F64, shrink: float) -> tuple[F64, F64]:
    mean = f.mean(axis=0)
    cov = np.cov(f, rowvar=False)
    diag = np.diag(np.diag(cov))
    cov = (1.0 - shrink) * cov + shrink * diag + 1e-6 * np.eye(cov.shape[0])
    return mean, np.asarray(np.linalg.inv(cov))


def fit(feats: npt.ArrayLike, feature_set: str, target_rate: float = 0.01, shrink: float = 0.1,
        folds: int = 5) -> Baseline:
    """Fit a baseline on healthy features (n, d) and calibrate its threshold to target_rate."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < max(2 * f.shape[1] // 3, 20) or not np.isfinite(f).all():
        need = max(2 * f.shape[1] // 3, 20)
        raise BaselineError(f"need at least {need} finite feature rows, got {f.shape}")
    if not 0.0 < target_rate < 0.5:
        raise BaselineError(f"target_rate {target_rate} must be in (0, 0.5)")
    idx = np.arange(f.shape[0]) % folds  # deterministic interleaved folds: drift is spread over all
    oof = np.empty(f.shape[0])
    for k in range(folds):
        mean, prec = _moments(f[idx != k], shrink)
        d = f[idx == k] - mean
        oof[idx == k] = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, prec, d), 0.0))
    mean, prec = _moments(f, shrink)
    threshold = float(np.quantile(oof, 1.0 - target_rate))
    return Baseline(mean=mean, precision=prec, threshold=threshold, feature_set=feature_set,
                    n_windows=int(f.shape[0]), target_rate=float(target_rate))
