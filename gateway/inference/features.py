"""Window -> feature vector: the preprocessing both edge models need, shared by training and runtime.

edge_models/train.py and the engine both call `extract` and `standardize`, so a model never sees
features computed differently from those it was trained on. Pure numpy.

Why features and not raw samples: an anomaly score on raw samples misses short bearing impulses
(see /work/shared/notes/litert.md); kurtosis and crest factor catch them, and log band powers make
shaft harmonics, resonances and noise floors comparable across machines with a single int8 scale.

Per axis (x, y, z), after removing the mean:
  log10 rms, log10 peak, log10 crest factor, log10 kurtosis, skewness (a one-sided clip skews),
  and log10 power in BANDS_HZ of the Hann-windowed spectrum.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

FEATURE_SET = "vib-v1"
# Fine at low frequency where shaft orders live (1x is 20-30 Hz), coarse above for resonances and impacts.
BANDS_HZ: tuple[float, ...] = (0.0, 15.0, 35.0, 55.0, 75.0, 110.0, 150.0, 220.0, 360.0, 480.0, 640.0, 800.0)
_STATS = ("log_rms", "log_peak", "log_crest", "log_kurtosis", "skew")
_EPS = 1e-9

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


def feature_names(bands_hz: Sequence[float] = BANDS_HZ) -> list[str]:
    per_axis = [*_STATS, *(f"band_{lo:g}_{hi:g}" for lo, hi in itertools.pairwise(bands_hz))]
    return [f"{axis}.{name}" for axis in "xyz" for name in per_axis]


def n_features(bands_hz: Sequence[float] = BANDS_HZ) -> int:
    return 3 * (len(_STATS) + len(bands_hz) - 1)


@functools.lru_cache(maxsize=8)
def _spectral_constants(window: int, sample_rate_hz: float, bands_hz: tuple[float, ...]) -> tuple[F64, F64]:
    """Hann taper and bin-to-band matrix; cached because the agent scores one window at a time."""
    return np.hanning(window), _band_matrix(window, sample_rate_hz, bands_hz)


def _band_matrix(window: int, sample_rate_hz: float, bands_hz: Sequence[float]) -> npt.NDArray[np.float64]:
    freqs = np.fft.rfftfreq(window, 1.0 / sample_rate_hz)
    edges = np.asarray(bands_hz, dtype=np.float64)
    m = np.zeros((freqs.size, edges.size - 1))
    for b in range(edges.size - 1):
        last = b == edges.size - 2
        m[:, b] = (freqs >= edges[b]) & ((freqs <= edges[b + 1]) if last else (freqs < edges[b + 1]))
    return m


def extract(x: npt.ArrayLike, sample_rate_hz: float = 1600.0,
            bands_hz: Sequence[float] = BANDS_HZ) -> F32:
    """x float (n, window, 3) in g -> float32 (n, n_features()) in the order of feature_names()."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected windows shaped (n, window, 3), got {a.shape}")
    n, w, _ = a.shape
    # (n, axis, time), contiguous in time: every reduction and the FFT then run over adjacent memory
    a = a.transpose(0, 2, 1).copy()
    a -= a.mean(axis=2, keepdims=True)
    a2 = a * a  # products, not **: float pow is an order of magnitude slower
    var = a2.mean(axis=2) + _EPS
    rms = np.sqrt(var)
    peak = np.abs(a).max(axis=2) + _EPS
    kurt = (a2 * a2).mean(axis=2) / (var * var)
    skew = (a2 * a).mean(axis=2) / (var * rms)
    taper, to_bands = _spectral_constants(w, float(sample_rate_hz), tuple(bands_hz))
    spec = np.fft.rfft(a * taper, axis=2)
    bands = (spec.real**2 + spec.imag**2) @ to_bands / w
    feats = np.empty((n, 3, len(_STATS) + to_bands.shape[1]))
    feats[:, :, 0] = np.log10(rms)
    feats[:, :, 1] = np.log10(peak)
    feats[:, :, 2] = feats[:, :, 1] - feats[:, :, 0]  # log crest factor
    feats[:, :, 3] = np.log10(kurt + _EPS)
    feats[:, :, 4] = skew
    feats[:, :, len(_STATS):] = np.log10(bands + _EPS)
    return feats.reshape(n, feats.shape[1] * feats.shape[2]).astype(np.float32)


def standardize(features: npt.ArrayLike, mean: npt.ArrayLike, std: npt.ArrayLike) -> F32:
    """(features - mean) / std with the training set's constants, which travel in the manifest."""
    f = np.asarray(features, dtype=np.float32)
    mu = np.asarray(mean, dtype=np.float32)
    sd = np.asarray(std, dtype=np.float32)
    if f.shape[-1] != mu.size or mu.size != sd.size:
        raise ValueError(f"{f.shape[-1]} features but {mu.size} means and {sd.size} deviations")
    return np.asarray((f - mu) / sd, dtype=np.float32)
