"""A fleet of physically varied machines: the data every generalisation figure is measured on.

`gateway.sim.generator` draws windows from one narrow family of machines (fixed 1200-1800 rpm, one
resonance band, one sensor chain), so models trained and judged there learn that family. This module
makes the machine-to-machine and window-to-window variation that a real plant has, so that models and
per-device baselines can be trained on some machines and judged on machines they never saw.

Per machine (drawn once from its seed):
  structural mode 150-650 Hz with damping ratio 0.02-0.10 (forces at shaft orders pass through it),
  mounting rotation (up to 35 degrees about each axis) and per-axis gain 0.7-1.4 of the sensor,
  healthy 1x 0.01-0.12 g with its own 2x / 3x, bearing geometry (BPFO 2.8-5.5 orders, BPFI = BPFO + 2),
  housing ring-down 300-700 Hz, sensor range +-4 g or +-16 g, white and 1/f noise, zero-g bias.
Per window: shaft speed drawn from the machine's operating range (inside 900-3600 rpm), drifting
  up to +-3 % inside the window; load 0.6-1.4 scales the forces.
Sensor chain: mounting rotation, axis gain, anti-alias low-pass (4th-order Butterworth magnitude at
  0.4 fs), white + 1/f noise, bias, 16-bit ADC over the range, saturating at full scale.
Faults, made by their mechanism:
  imbalance     1x radial force x2-5
  misalignment  strong 2x radial (1.0-2.0 of 1x) and an axial 1x/2x
  looseness     half orders and a harmonic comb, one-sided truncation of the radial motion
  bearing       outer race: impacts at BPFO ringing the housing; inner race: impacts at BPFI whose
                amplitude is modulated by the load zone at 1x (each window picks one of the two)
  shift         the structural mode drops to 0.5-0.75 of its frequency and loosens (more response)
  gear          (held out: in none of the model's classes) gear mesh at z x shaft speed (z 6-14,
                kept below 0.4 fs) with sidebands at +-1x and +-2x
Pure numpy, seeded: the same (seed, machine, window index) always gives the same samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from gateway.sim.generator import FAULTS

# The known classes are exactly the shipped generator's (and the classifier's) label set.
KNOWN: tuple[str, ...] = FAULTS
HELD_OUT: tuple[str, ...] = ("gear",)
LABELS: tuple[str, ...] = KNOWN + HELD_OUT

F64 = npt.NDArray[np.float64]
Windows = npt.NDArray[np.float32]
Ints = npt.NDArray[np.int64]
_TWO_PI = 2.0 * np.pi


@dataclass(frozen=True)
class PhysMachine:
    """One machine's constants."""

    mode_hz: float
    zeta: float
    rotation: F64  # (3, 3) sensor mounting
    gain: F64  # (3,) per-axis sensitivity error
    a1: float
    h2: float
    h3: float
    axial: float
    rpm_lo: float
    rpm_hi: float
    bpfo: float
    ring_hz: float
    ring_tau_s: float
    range_g: float
    white_g: float
    pink_g: float
    bias_g: F64
    broadband_g: float
    # fault severities, fixed per machine
    imb_gain: float
    mis_2x: float
    mis_axial: float
    loose_decay: float
    loose_clip: float
    bear_peak: float
    shift_ratio: float
    shift_gain: float
    gear_teeth: int
    gear_amp: float


def _rot(rng: np.random.Generator) -> F64:
    out = np.eye(3)
    for axis in range(3):
        a = np.deg2rad(rng.uniform(-35.0, 35.0))
        c, s = np.cos(a), np.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = out @ r
    return out


def draw_machine(rng: np.random.Generator) -> PhysMachine:
    u = rng.uniform
    lo = u(900.0, 2400.0)
    hi = min(3600.0, lo + u(300.0, 2700.0))
    return PhysMachine(
        mode_hz=u(150.0, 650.0), zeta=u(0.02, 0.10), rotation=_rot(rng), gain=rng.uniform(0.7, 1.4, 3),
        a1=float(np.exp(u(np.log(0.01), np.log(0.12)))), h2=u(0.1, 0.4), h3=u(0.03, 0.15), axial=u(0.05, 0.3),
        rpm_lo=lo, rpm_hi=hi, bpfo=u(2.8, 5.5), ring_hz=u(300.0, 700.0), ring_tau_s=u(0.001, 0.004),
        range_g=float(rng.choice([4.0, 16.0])), white_g=u(0.001, 0.008), pink_g=u(0.001, 0.01),
        bias_g=rng.uniform(-0.08, 0.08, 3), broadband_g=u(0.004, 0.03),
        imb_gain=u(2.0, 5.0), mis_2x=u(1.0, 2.0), mis_axial=u(0.5, 1.2),
        loose_decay=u(0.45, 0.8), loose_clip=u(0.3, 0.7), bear_peak=u(0.15, 0.6),
        shift_ratio=u(0.5, 0.75), shift_gain=u(1.8, 3.5), gear_teeth=int(rng.integers(6, 15)),
        gear_amp=u(0.8, 2.5),
    )


def _mode_gain(m: PhysMachine, f_hz: F64, mode_hz: float) -> F64:
    """Single-degree-of-freedom response to a force at f_hz, 1 well below the mode."""
    r = f_hz / mode_hz
    return np.asarray(1.0 / np.sqrt((1.0 - r**2) ** 2 + (2.0 * m.zeta * r) ** 2))


Lines = tuple[Sequence[float], Sequence[F64], Sequence[float]]  # orders, (3,) force vectors in g, phases


def _orders(m: PhysMachine, phase: F64, f_inst: F64, lines: Lines,
            mode_hz: float) -> F64:
    """Forces at shaft orders through the structural mode."""
    orders, amps, phases = lines
    out = np.zeros((phase.size, 3))
    fmean = float(f_inst.mean())
    for order, amp, ph in zip(orders, amps, phases, strict=True):
        g = float(_mode_gain(m, np.array([order * fmean]), mode_hz)[0])
        out += g * amp[None, :] * np.sin(order * phase + ph)[:, None]
    return out


def _shaped_noise(rng: np.random.Generator, n: int, fs: float, centre: float, zeta: float) -> F64:
    spec = np.fft.rfft(rng.standard_normal((3, n)), axis=1)
    r = np.fft.rfftfreq(n, 1.0 / fs) / centre
    spec *= 1.0 / np.sqrt((1.0 - r**2) ** 2 + (2.0 * zeta * r) ** 2)
    out = np.fft.irfft(spec, n=n, axis=1).T
    return np.asarray(out / (np.sqrt(np.mean(out**2)) + 1e-12))


def _impacts(rng: np.random.Generator, t: F64, phase: F64, *, order: float, m: PhysMachine,
             modulate: bool) -> F64:
    """Impacts each time the shaft phase passes a multiple of 2pi/order, ringing the housing."""
    k = np.floor(phase * order / _TWO_PI)
    # the padding before the window (20 ms) covers the ring-down of impacts before it
    starts = np.nonzero(np.diff(k) > 0)[0] + 1
    sig = np.zeros(t.size)
    dt_s = t[1] - t[0]
    for s in starts:
        dt = (np.arange(t.size) - s + rng.normal(0.0, 0.3)) * dt_s
        amp = rng.uniform(0.7, 1.0)
        if modulate:  # the defect passes through the load zone once per shaft turn
            ph = phase[s]
            amp *= 0.15 + 0.85 * max(0.0, np.cos(ph)) ** 2
        sig += np.where(dt >= 0, amp * np.exp(-np.clip(dt, 0, None) / m.ring_tau_s)
                        * np.sin(_TWO_PI * m.ring_hz * dt), 0.0)
    return np.asarray(sig[:, None] * np.array([1.0, 0.6, 0.2])[None, :] * m.bear_peak)


def _lowpass(x: F64, fs: float) -> F64:
    spec = np.fft.rfft(x, axis=0)
    f = np.fft.rfftfreq(x.shape[0], 1.0 / fs)
    spec *= (1.0 / np.sqrt(1.0 + (f / (0.4 * fs)) ** 8))[:, None]
    return np.asarray(np.fft.irfft(spec, n=x.shape[0], axis=0))


def synth(m: PhysMachine, label: str, rng: np.random.Generator, fs: float = 1600.0,
          window: int = 128) -> F64:
    """One (window, 3) window in g of machine m in state label."""
    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}; expected one of {', '.join(LABELS)}")
    pad = 32  # the anti-alias filter and impacts settle before the window starts
    n = window + 2 * pad
    t = np.arange(n) / fs
    f0 = rng.uniform(m.rpm_lo, m.rpm_hi) / 60.0
    drift = rng.uniform(-0.03, 0.03)
    f_inst = f0 * (1.0 + drift * (t / t[-1] - 0.5))
    phase = rng.uniform(0, _TWO_PI) + _TWO_PI * np.cumsum(f_inst) / fs
    load = rng.uniform(0.6, 1.4)
    radial = np.array([1.0, 1.0, 0.0])
    axial = np.array([0.0, 0.0, 1.0])
    ph = rng.uniform(0, _TWO_PI, 8)
    a1 = m.a1 * load
    # a fault's force has its own severity: on a very smooth machine (tiny healthy 1x) a fault still
    # shows as at least a moderately rough one would, as a condition-monitoring alarm level assumes
    sev = max(m.a1, 0.03) * load
    imb = 1.0 + (m.imb_gain - 1.0) * sev / a1 if label == "imbalance" else 1.0
    orders: list[float] = [1.0, 1.0, 2.0, 3.0]
    amps: list[F64] = [a1 * imb * np.array([1.0, 0.0, 0.0]), a1 * imb * np.array([0.0, 0.9, 0.0]),
                       a1 * m.h2 * radial, a1 * m.h3 * radial]
    phases: list[float] = [ph[0], ph[0] - np.pi / 2, ph[1], ph[2]]
    amps.append(a1 * m.axial * axial)
    orders.append(1.0)
    phases.append(ph[3])
    if label == "misalignment":
        amps += [sev * m.mis_2x * radial, sev * m.mis_axial * axial, sev * m.mis_axial * 0.8 * axial]
        orders += [2.0, 1.0, 2.0]
        phases += [ph[4], ph[5], ph[6]]
    mode = m.mode_hz * (m.shift_ratio if label == "shift" else 1.0)
    x = _orders(m, phase, f_inst, (orders, amps, phases), mode)
    if label == "looseness":
        los = [k / 2.0 for k in range(1, 21) if k not in (2, 4, 6)]
        lam = [sev * m.loose_decay ** (o / 2.0) * radial for o in los]
        x += _orders(m, phase, f_inst, (los, lam, list(rng.uniform(0, _TWO_PI, len(los)))), mode)
        for ax in (0, 1):
            lim = -m.loose_clip * np.max(np.abs(x[:, ax]))
            x[:, ax] = np.maximum(x[:, ax], lim)
    if label == "bearing":
        inner = bool(rng.integers(0, 2))
        x += _impacts(rng, t, phase, order=m.bpfo + (2.0 if inner else 0.0), m=m, modulate=inner)
    if label == "gear":
        z = m.gear_teeth
        while z > 2 and z * f0 * 1.02 > 0.4 * fs:
            z -= 1
        side = [float(z), z - 1.0, z + 1.0, z - 2.0, z + 2.0]
        rel = [1.0, 0.5, 0.5, 0.25, 0.25]
        force = [sev * m.gear_amp * r * np.array([1.0, 0.7, 0.4]) for r in rel]
        x += _orders(m, phase, f_inst, (side, force, list(rng.uniform(0, _TWO_PI, 5))), mode)
    gain = m.shift_gain if label == "shift" else 1.0
    zeta = m.zeta * (0.7 if label == "shift" else 1.0)
    x += m.broadband_g * load * gain * _shaped_noise(rng, n, fs, mode, zeta)
    # sensor chain
    x = x @ m.rotation.T * m.gain[None, :]
    x = _lowpass(x, fs)
    x = x[pad:pad + window]
    pink = np.fft.rfft(rng.standard_normal((window, 3)), axis=0)
    pink[1:] /= np.sqrt(np.arange(1, pink.shape[0]))[:, None]
    pink[0] = 0
    pn = np.fft.irfft(pink, n=window, axis=0)
    x = x + m.pink_g * pn / (pn.std() + 1e-12) + rng.normal(0.0, m.white_g, x.shape) + m.bias_g[None, :]
    lsb = 2.0 * m.range_g / 65536.0
    codes = np.clip(np.round(x / lsb), -32768, 32767)
    return np.asarray(codes * lsb)


class Fleet:
    """n_machines machines from one seed; windows(machine, label, n, stream) draws reproducibly."""

    def __init__(self, seed: int, n_machines: int = 64) -> None:
        if n_machines < 1:
            raise ValueError("n_machines must be >= 1")
        self.seed = int(seed)
        rng = np.random.default_rng(seed)
        self.machines = [draw_machine(rng) for _ in range(n_machines)]

    def windows(self, machine: int, label: str, n: int, stream: int = 0) -> npt.NDArray[np.float32]:
        """n windows (n, 128, 3) float32 of one machine; stream separates independent draws."""
        rng = np.random.default_rng([self.seed, machine, LABELS.index(label), stream])
        m = self.machines[machine]
        return np.stack([synth(m, label, rng) for _ in range(n)]).astype(np.float32)

    def dataset(self, machines: Sequence[int], per_class: int, labels: Sequence[str] = LABELS,
                stream: int = 1) -> tuple[Windows, Ints, Ints]:
        """windows, label index into LABELS, machine id: per_class windows per machine and label."""
        xs, ys, ms = [], [], []
        for mid in machines:
            for lab in labels:
                xs.append(self.windows(mid, lab, per_class, stream))
                ys.append(np.full(per_class, LABELS.index(lab)))
                ms.append(np.full(per_class, mid))
        return np.concatenate(xs), np.concatenate(ys).astype(np.int64), np.concatenate(ms).astype(np.int64)
