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


# --- order-normalised features (vib-ord1): what a per-device baseline needs on a machine whose speed varies
ORDER_SET = "vib-v1+ord1"
ORDERS: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
_SPEED_HZ = (13.0, 62.0)  # 780-3720 rpm: the search range for the shaft's 1x
_PAD = 2048


def estimate_speed_hz(x: npt.ArrayLike, sample_rate_hz: float = 1600.0) -> F64:
    """Per window, the frequency of the strongest line in the 1x search range (zero-padded FFT, parabolic
    interpolation). A window too short to resolve 1x from 2x well still gives a consistent estimate:
    what matters to a baseline is that the same machine state maps to the same orders."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 2:
        a = a[None]
    a = a - a.mean(axis=1, keepdims=True)
    w = a.shape[1]
    spec = np.abs(np.fft.rfft(a * np.hanning(w)[None, :, None], n=_PAD, axis=1)) ** 2
    p = spec.sum(axis=2)
    freqs = np.fft.rfftfreq(_PAD, 1.0 / sample_rate_hz)
    lo, hi = np.searchsorted(freqs, _SPEED_HZ)
    k = lo + p[:, lo:hi].argmax(axis=1)
    k = np.clip(k, 1, p.shape[1] - 2)
    rows = np.arange(p.shape[0])
    y0, y1, y2 = np.log(p[rows, k - 1] + _EPS), np.log(p[rows, k] + _EPS), np.log(p[rows, k + 1] + _EPS)
    den = y0 - 2 * y1 + y2
    off = np.where(np.abs(den) > 1e-12, 0.5 * (y0 - y2) / np.where(den == 0, 1, den), 0.0)
    return np.asarray((k + np.clip(off, -0.5, 0.5)) * freqs[1])


def order_features(x: npt.ArrayLike, sample_rate_hz: float = 1600.0) -> F32:
    """x (n, window, 3) -> (n, 26): log shaft speed, log amplitude at each of ORDERS per axis (least-squares
    fit of sines at the estimated speed), and per axis log kurtosis and log crest of the residual after
    removing those orders (impacts and their ring-down live there), and the log residual rms."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 2:
        a = a[None]
    n, w, _ = a.shape
    f1 = estimate_speed_hz(a, sample_rate_hz)
    t = np.arange(w) / sample_rate_hz
    # one design matrix per window (its own speed), all solved at once by batched QR: the same
    # least-squares answer as a loop of lstsq (coefficients agree to 1e-10 relative; the designs are
    # full rank, condition number under 1e6) at a tenth of the time, which the gateway pays per window
    arg = 2 * np.pi * np.asarray(ORDERS)[None, :, None] * f1[:, None, None] * t[None, None, :]  # (n, o, w)
    design = np.empty((n, w, 2 + 2 * len(ORDERS)))
    design[:, :, 0] = 1.0
    design[:, :, 1] = t - t.mean()
    design[:, :, 2::2] = np.sin(arg).transpose(0, 2, 1)
    design[:, :, 3::2] = np.cos(arg).transpose(0, 2, 1)
    q, r = np.linalg.qr(design)
    coef = np.linalg.solve(r, np.swapaxes(q, 1, 2) @ a)  # (n, 14, 3)
    amp = np.sqrt(coef[:, 2::2] ** 2 + coef[:, 3::2] ** 2)  # (n, orders, 3)
    res = a - design @ coef
    r2 = res * res
    var = r2.mean(axis=1) + _EPS
    kurt = (r2 * r2).mean(axis=1) / (var * var)
    crest = np.abs(res).max(axis=1) / np.sqrt(var)
    out = np.empty((n, 1 + 3 * len(ORDERS) + 9))
    out[:, 0] = np.log10(f1)
    out[:, 1:1 + 3 * len(ORDERS)] = np.log10(amp.transpose(0, 2, 1).reshape(n, 3 * len(ORDERS)) + 1e-5)
    out[:, -9:-6] = np.log10(kurt + _EPS)
    out[:, -6:-3] = np.log10(crest + _EPS)
    out[:, -3:] = 0.5 * np.log10(var)
    return out.astype(np.float32)


def extract_for_baseline(x: npt.ArrayLike, sample_rate_hz: float = 1600.0) -> F32:
    """The feature vector a per-device baseline is fitted on (ORDER_SET): vib-v1 plus order features."""
    return extract_set(ORDER_SET, x, sample_rate_hz)


# --- the named feature sets a manifest may ask for: the one place that maps a name to its code
def extract_set(name: str, x: npt.ArrayLike, sample_rate_hz: float = 1600.0,
                bands_hz: Sequence[float] = BANDS_HZ) -> F32:
    """Features of set `name` (a manifest's preprocessing.features) for windows x (n, window, 3)."""
    if name == FEATURE_SET:
        return extract(x, sample_rate_hz, bands_hz)
    if name == ORDER_SET:
        return np.concatenate([extract(x, sample_rate_hz, bands_hz), order_features(x, sample_rate_hz)],
                              axis=1)
    raise ValueError(f"unknown feature set {name!r}; known: {FEATURE_SET}, {ORDER_SET}")


def n_features_of(name: str, bands_hz: Sequence[float] = BANDS_HZ) -> int:
    if name == FEATURE_SET:
        return n_features(bands_hz)
    if name == ORDER_SET:
        return n_features(bands_hz) + 1 + 3 * len(ORDERS) + 9
    raise ValueError(f"unknown feature set {name!r}; known: {FEATURE_SET}, {ORDER_SET}")
