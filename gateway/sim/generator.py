"""The one seeded sensor generator: 3-axis vibration windows of a rotating machine, healthy or faulty.

Everything that needs sensor data (the agent's simulated source, edge_models/train.py, tests, benchmarks)
draws it from here, so the models are trained on exactly what the system later sees. Pure numpy: no IO,
no clock; the same seed always gives the same samples.

Signal model (units: g; axes x, y radial, z axial; default 128 samples at 1600 Hz = 80 ms):

- healthy: shaft speed f1 in [20, 30] Hz (1200-1800 rpm). 1x radial component 0.04-0.10 g (y about 90
  degrees behind x, as an elliptical orbit), 2x at 15-35 % and 3x at 5-15 % of it, a weak axial 1x.
  A structural resonance at 280-340 Hz excited by broadband forces (0.010-0.025 g rms), plus white
  sensor noise (0.004-0.010 g rms).
- imbalance: the 1x radial component grows 2-5 times (a heavy spot: force at shaft speed only).
- misalignment: 2x radial grows to 0.6-1.4 times the 1x, and a strong axial 1x and 2x (0.4-1.0 times
  the radial 1x) appear: the coupling bends the shaft twice per turn and pushes it along its axis.
- looseness: a comb of harmonics up to 10x plus half-order sub-harmonics (0.5x, 1.5x, ...), then the
  radial signal is clipped on one side (the foot lifts and hits its stop): the rattle of a loose mount.
- bearing: an outer-race defect: impacts at BPFO = 3.0-5.0 times shaft speed (1-2 % timing jitter),
  each ringing the bearing housing at 450-650 Hz and dying away in 1.5-3 ms, 0.1-0.6 g peak.
  Short impulses barely move the rms, which is why the edge models look at kurtosis and crest factor.
- shift: the structural resonance drops to 150-220 Hz and rings 1.5-3.5 times harder: stiffness lost
  through a cracked mount or weakened foundation.

`Generator` draws an independent machine for every window (speed, amplitudes, phases, fault severity);
`Machine` keeps one machine and produces a continuous stream whose fault follows a schedule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FAULTS: tuple[str, ...] = ("healthy", "imbalance", "misalignment", "looseness", "bearing", "shift")

Window = npt.NDArray[np.float32]
_TWO_PI = 2.0 * np.pi


@dataclass(frozen=True)
class _Machine:
    """One machine's constants, healthy and for every fault, drawn once from a generator."""

    f1: float
    a1: float
    y_ratio: float
    h2: float
    h3: float
    axial: float
    phases: npt.NDArray[np.float64]  # one per (harmonic slot, axis)
    res_hz: float
    res_rms: float
    noise_rms: float
    imb_gain: float
    mis_2x: float
    mis_axial: float
    loose_decay: float
    loose_clip: float
    bpfo_order: float
    bear_hz: float
    bear_tau_s: float
    bear_peak: float
    bear_t0: float
    shift_hz: float
    shift_gain: float


def _draw(rng: np.random.Generator) -> _Machine:
    u = rng.uniform
    phases = rng.uniform(0.0, _TWO_PI, size=(21, 3))
    phases[:, 1] = phases[:, 0] - np.pi / 2  # y lags x by a quarter turn: an elliptical shaft orbit
    return _Machine(
        f1=u(20.0, 30.0), a1=u(0.04, 0.10), y_ratio=u(0.7, 1.3), h2=u(0.15, 0.35), h3=u(0.05, 0.15),
        axial=u(0.05, 0.2), phases=phases,
        res_hz=u(280.0, 340.0), res_rms=u(0.010, 0.025), noise_rms=u(0.004, 0.010),
        imb_gain=u(2.0, 5.0), mis_2x=u(0.6, 1.4), mis_axial=u(0.4, 1.0),
        loose_decay=u(0.4, 0.75), loose_clip=u(0.35, 0.7),
        bpfo_order=u(3.0, 5.0), bear_hz=u(450.0, 650.0), bear_tau_s=u(0.0015, 0.003), bear_peak=u(0.1, 0.6),
        bear_t0=u(0.0, 1.0), shift_hz=u(150.0, 220.0), shift_gain=u(1.5, 3.5),
    )


def _resonance(rng: np.random.Generator, n: int, fs: float, centre: float,
               rms: float) -> npt.NDArray[np.float64]:
    """Broadband force through a lightly damped mode: white noise shaped by a resonance in frequency."""
    spec = np.fft.rfft(rng.standard_normal((3, n)), axis=1)
    freqs = np.fft.rfftfreq(n, 1.0 / fs)
    width = centre * 0.06
    spec *= 1.0 / (1.0 + ((freqs - centre) / width) ** 2)
    out = np.fft.irfft(spec, n=n, axis=1).T
    cur = np.sqrt(np.mean(out**2)) + 1e-12
    return np.asarray(out * (rms / cur))


def _harmonics(m: _Machine, t: npt.NDArray[np.float64], amps: npt.NDArray[np.float64],
               orders: Sequence[float], slot0: int) -> npt.NDArray[np.float64]:
    """Shaft-order sinusoids, amps (orders, 3); fixed machine phases keep a stream continuous."""
    out = np.zeros((t.size, 3))
    for k, order in enumerate(orders):
        ph = m.phases[slot0 + k]
        out += amps[k] * np.sin(_TWO_PI * order * m.f1 * t[:, None] + ph[None, :])
    return out


def _synth(m: _Machine, label: str, t: npt.NDArray[np.float64], fs: float,
           rng: np.random.Generator) -> npt.NDArray[np.float64]:
    if label not in FAULTS:
        raise ValueError(f"unknown fault {label!r}; expected one of {', '.join(FAULTS)}")
    radial = np.array([1.0, m.y_ratio, 0.0])
    axial = np.array([0.0, 0.0, 1.0])
    a1 = m.a1 * (m.imb_gain if label == "imbalance" else 1.0)
    amp1 = a1 * radial + m.a1 * m.axial * axial
    amp2 = m.a1 * m.h2 * radial
    if label == "misalignment":
        amp2 = m.a1 * m.mis_2x * radial
        amp1 = amp1 + m.a1 * m.mis_axial * axial
    amp3 = m.a1 * m.h3 * radial
    amps = np.stack([amp1, amp2, amp3])
    x = _harmonics(m, t, amps, (1.0, 2.0, 3.0), 0)
    if label == "misalignment":
        x += _harmonics(m, t, np.array([m.a1 * m.mis_axial * 0.8 * axial]), (2.0,), 3)
    if label == "looseness":
        orders = [k / 2.0 for k in range(1, 21) if k not in (2, 4, 6)]
        comb = np.array([m.a1 * m.loose_decay ** (o / 2.0) * radial for o in orders])
        x += _harmonics(m, t, comb, orders, 4)
        # a loose foot hits its stop: the radial motion is clipped on one side only
        for ax in (0, 1):
            lim = -m.loose_clip * np.max(np.abs(x[:, ax]))
            x[:, ax] = np.maximum(x[:, ax], lim)
    if label == "bearing":
        x += _bearing(m, t, rng)
    if label == "shift":
        x += _resonance(rng, t.size, fs, m.shift_hz, m.res_rms * m.shift_gain)
    else:
        x += _resonance(rng, t.size, fs, m.res_hz, m.res_rms)
    x += rng.normal(0.0, m.noise_rms, size=x.shape)
    return x


def _bearing(m: _Machine, t: npt.NDArray[np.float64], rng: np.random.Generator) -> npt.NDArray[np.float64]:
    period = 1.0 / (m.bpfo_order * m.f1)
    ring = 6.0 * m.bear_tau_s  # an impact is negligible after six time constants
    first = int(np.floor((t[0] - ring - m.bear_t0) / period))
    last = int(np.ceil((t[-1] - m.bear_t0) / period))
    idx = np.arange(first, last + 1)
    hits = m.bear_t0 + idx * period + rng.normal(0.0, 0.015 * period, size=idx.size)
    dt = t[None, :] - hits[:, None]
    shape = np.where(dt >= 0.0, np.exp(-np.clip(dt, 0.0, None) / m.bear_tau_s), 0.0)
    sig = (shape * np.sin(_TWO_PI * m.bear_hz * dt) * rng.uniform(0.7, 1.0, size=(idx.size, 1))).sum(axis=0)
    # the load zone is below the shaft: the impacts show mostly on x, less on y, hardly along the axis
    return np.asarray(m.bear_peak * sig[:, None] * np.array([1.0, 0.5, 0.15])[None, :])


class Generator:
    """Independent windows: every window is a freshly drawn machine in the given state."""

    def __init__(self, seed: int, sample_rate_hz: float = 1600.0, window: int = 128) -> None:
        if window < 16 or sample_rate_hz <= 0:
            raise ValueError("window must be >= 16 samples and sample_rate_hz positive")
        self._rng = np.random.default_rng(seed)
        self.sample_rate_hz = float(sample_rate_hz)
        self.window_len = int(window)

    def window(self, label: str) -> Window:
        """One (window, 3) float32 window of a random machine in state `label`."""
        m = _draw(self._rng)
        t0 = self._rng.uniform(0.0, 10.0)
        t = t0 + np.arange(self.window_len) / self.sample_rate_hz
        return _synth(m, label, t, self.sample_rate_hz, self._rng).astype(np.float32)

    def batch(self, n: int, labels: Sequence[str] | None = None) -> tuple[Window, npt.NDArray[np.int64]]:
        """n windows, balanced over `labels` (default: all of FAULTS) in shuffled order.

        Returns x float32 (n, window, 3) and y, the index of each window's label in FAULTS.
        """
        names = list(FAULTS if labels is None else labels)
        if not names:
            raise ValueError("labels must not be empty")
        ids = np.array([FAULTS.index(s) if s in FAULTS else -1 for s in names])
        if (ids < 0).any():
            raise ValueError(f"unknown fault in {names!r}; expected from {', '.join(FAULTS)}")
        y = self._rng.permutation(np.resize(ids, n)).astype(np.int64)
        x = np.empty((n, self.window_len, 3), dtype=np.float32)
        for i, k in enumerate(y):
            x[i] = self.window(FAULTS[k])
        return x, y


class Machine:
    """One machine streamed over time; `schedule` lists (at_s, duration_s, fault) episodes.

    next_window(t_s) returns the window whose first sample is at t_s and the label in force at t_s.
    Shaft phases follow absolute time, so consecutive windows join into one continuous signal; the
    machine's speed, amplitudes and fault severities are fixed at construction.
    """

    def __init__(self, seed: int, sample_rate_hz: float = 1600.0, window: int = 128,
                 schedule: Sequence[tuple[float, float, str]] = ()) -> None:
        for at_s, duration_s, fault in schedule:
            if fault not in FAULTS or duration_s < 0:
                raise ValueError(f"bad schedule entry {(at_s, duration_s, fault)!r}")
        self._rng = np.random.default_rng(seed)
        self._m = _draw(self._rng)
        self.sample_rate_hz = float(sample_rate_hz)
        self.window_len = int(window)
        self.schedule = [(float(a), float(d), str(f)) for a, d, f in schedule]

    def label_at(self, t_s: float) -> str:
        for at_s, duration_s, fault in self.schedule:
            if at_s <= t_s < at_s + duration_s:
                return fault
        return "healthy"

    def next_window(self, t_s: float) -> tuple[Window, str]:
        label = self.label_at(t_s)
        t = t_s + np.arange(self.window_len) / self.sample_rate_hz
        return _synth(self._m, label, t, self.sample_rate_hz, self._rng).astype(np.float32), label
