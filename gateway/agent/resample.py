"""`[source] resample_hz`: a sensor that cannot sample at the model's rate (the ADXL355 offers 4000, 2000,
1000 ... Hz; the shipped models expect 1600) is resampled on the device, before the prefilter.

`Resampler` is a streaming rational-rate resampler (windowed-sinc interpolation, a Kaiser window, DC gain
1, the cut-off below both Nyquist rates) over one continuous stretch of samples at a time. A break in the
stretch (a window the source flagged as after a gap) ends it: the tail is finished by holding the last
sample, the next stretch starts by holding its first, so no input sample is dropped and no output mixes
both sides of a hole; the window after it stays flagged. `ResampledSource` wraps any source: its
contiguous windows are one stream, re-cut into windows of the same length at the new rate.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from fractions import Fraction

import numpy as np
import numpy.typing as npt

from gateway.agent.capture import Captured, Source
from gateway.agent.windowing import SourceStats, Windower
from gateway.errors import ConfigError

F32 = npt.NDArray[np.float32]
MAX_DENOMINATOR = 64  # 2000 -> 1600 is 4/5; a ratio that needs more phases is refused, not approximated
# Sinc zero crossings each side of an output sample. Measured for 2000 -> 1600 Hz (68 taps): flat
# within 0.01 dB to 650 Hz, -2.2 dB at 700 Hz, below -90 dB from 800 Hz (tests/test_agent_resample.py).
HALF_TAPS = 24
BETA = 8.0  # Kaiser window shape
ROLLOFF = 0.9  # cut-off as a fraction of the lower Nyquist rate: the band edge stays out of the output


def ratio(in_hz: float, out_hz: float) -> Fraction:
    """out/in as a small fraction; ConfigError when no fraction with a denominator <= 64 is exact."""
    frac = Fraction(out_hz / in_hz).limit_denominator(MAX_DENOMINATOR)
    if not math.isclose(float(frac) * in_hz, out_hz, rel_tol=1e-9):
        raise ConfigError(f"source.resample_hz: {out_hz:g} Hz is not a simple ratio of {in_hz:g} Hz "
                          f"(at most {MAX_DENOMINATOR} phases)")
    return frac


class Resampler:
    """push() input samples of one stretch, get the output samples they complete; end() finishes it.

    Internally the stretch is padded: its first sample held `half` times before it and, at end(), its
    last held `half` times after it. Real input i is padded index i + half; output n sits at real
    position n * down / up and uses padded indices base + 1 .. base + 2 * half, base = n * down // up.
    """

    def __init__(self, in_hz: float, out_hz: float, axes: int) -> None:
        frac = ratio(in_hz, out_hz)
        self._up, self._down = frac.numerator, frac.denominator
        cutoff = min(1.0, float(frac)) * ROLLOFF  # pass band edge, times 2, in cycles per input sample
        self._half = math.ceil(HALF_TAPS / cutoff)
        phases = np.arange(self._up)[:, None] / self._up
        t = phases + self._half - 1 - np.arange(2 * self._half)[None, :]  # output minus tap position
        r = np.clip(t / self._half, -1.0, 1.0)
        h = cutoff * np.sinc(cutoff * t) * np.i0(BETA * np.sqrt(1.0 - r * r)) / np.i0(BETA)
        self._h = h / h.sum(axis=1, keepdims=True)  # DC gain exactly 1 in every phase
        self._axes = axes
        self._reset()

    def _reset(self) -> None:
        self._buf = np.empty((0, self._axes), dtype=np.float64)
        self._first = 0  # padded index of _buf[0]
        self._next = 0  # next output index of this stretch
        self._started = False

    def push(self, x: F32) -> F32:
        if not x.shape[0]:
            return _none(self._axes)
        data = x.astype(np.float64)
        if not self._started:
            data = np.concatenate([np.repeat(data[:1], self._half, axis=0), data])
            self._started = True
        self._buf = np.concatenate([self._buf, data])
        return self._emit(None)

    def end(self) -> F32:
        """Finish the stretch; the next push starts a new one."""
        if not self._started:
            return _none(self._axes)
        last_real = self._first + self._buf.shape[0] - 1 - self._half  # real index of the last sample
        self._buf = np.concatenate([self._buf, np.repeat(self._buf[-1:], self._half, axis=0)])
        out = self._emit(last_real)
        self._reset()
        return out

    def _emit(self, last_real: int | None) -> F32:
        up, down, half = self._up, self._down, self._half
        total = self._first + self._buf.shape[0]
        n_max = ((total - 2 * half) * up - 1) // down  # base + 2 * half <= total - 1
        if last_real is not None:
            n_max = min(n_max, last_real * up // down)  # nothing past the last real sample
        if n_max < self._next:
            return _none(self._axes)
        n = np.arange(self._next, n_max + 1)
        base = (n * down) // up
        idx = (base + 1 - self._first)[:, None] + np.arange(2 * half)[None, :]
        out: npt.NDArray[np.float64] = np.einsum("nj,nja->na", self._h[(n * down) % up], self._buf[idx])
        self._next = n_max + 1
        keep_from = (self._next * down) // up + 1 - self._first
        if keep_from > 0:
            self._buf = self._buf[keep_from:]
            self._first += keep_from
        return out.astype(np.float32)


def _none(axes: int) -> F32:
    return np.empty((0, axes), dtype=np.float32)


class ResampledSource:
    """Any source at its own rate, seen by the agent at `out_hz` (the model's), same window length."""

    def __init__(self, inner: Source, out_hz: float) -> None:
        ratio(inner.sample_rate_hz, out_hz)  # an unusable ratio is refused before anything runs
        self._inner = inner
        self.kind = inner.kind
        self.window = inner.window
        self.sample_rate_hz = out_hz
        self.axes = int(getattr(inner, "axes", 3))
        # The inner source counts gaps, overruns and refusals (AgentMetrics.sync_source reads them here).
        self.stats: SourceStats = getattr(inner, "stats", SourceStats())

    async def windows(self) -> AsyncIterator[Captured]:
        resampler = Resampler(self._inner.sample_rate_hz, self.sample_rate_hz, self.axes)
        # Cuts only: its own gap count is not reported (the inner source's is).
        windower = Windower(window=self.window, axes=self.axes, sample_rate_hz=self.sample_rate_hz,
                            stats=SourceStats())
        period_ns = 1e9 / self.sample_rate_hz
        stretch_ns: int | None = None  # start of the current stretch; output times count from it
        produced = 0
        gap = False  # the next output starts after a hole: flag its window

        def cut(part: F32) -> list[Captured]:
            nonlocal produced, gap
            if not part.shape[0] or stretch_ns is None:
                return []
            times = (stretch_ns + (produced + np.arange(part.shape[0])) * period_ns).astype(np.int64)
            produced += part.shape[0]
            out = windower.push(part, times, discontinuity=gap)
            gap = False
            return out

        async for captured in self._inner.windows():
            if captured.gap and stretch_ns is not None:
                for window in cut(resampler.end()):
                    yield window
                stretch_ns, gap = None, True
            if stretch_ns is None:
                stretch_ns, produced = captured.start_ns, 0
            for window in cut(resampler.push(captured.samples)):
                yield window
