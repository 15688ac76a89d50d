"""Cutting a stream of timestamped samples into the agent's fixed windows, with gap detection.

Used by the sources that read a live stream (IIO, pipe). A gap is any discontinuity in the sample clock:
consecutive timestamps further apart than 1.5 sample periods or not increasing, or one the source reports
(a lost frame, a full kernel buffer). Every gap is counted once; the window that holds the first sample
after it is flagged (`Captured.gap`). Samples stay in the window they arrived in: a gap does not drop data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from gateway.agent.capture import Captured

GAP_PERIODS = 1.5  # a sample later than this many periods after the previous one starts a gap


@dataclass
class SourceStats:
    """What a live source counts; AgentMetrics.sync_source mirrors it into Prometheus."""

    overruns: int = 0  # reads that found the kernel buffer full (samples were probably dropped)
    gaps: int = 0  # discontinuities in the sample clock, overruns included
    refused: dict[str, int] = field(default_factory=dict)  # malformed input, by reason

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1


class Windower:
    """push() samples with their Unix ns timestamps; get back every window that filled up."""

    def __init__(self, *, window: int, axes: int, sample_rate_hz: float, stats: SourceStats) -> None:
        self.window = window
        self.axes = axes
        self._period_ns = 1e9 / sample_rate_hz
        self._stats = stats
        self._buf = np.empty((window, axes), dtype=np.float32)
        self._fill = 0
        self._start_ns = 0
        self._flag = False
        self._last_ns: int | None = None

    def push(
        self,
        samples: npt.NDArray[np.float32],
        times_ns: npt.NDArray[np.int64],
        *,
        discontinuity: bool = False,
    ) -> list[Captured]:
        """samples (k, axes) float32, times_ns (k,); discontinuity: the source saw a break before sample 0."""
        k = samples.shape[0]
        if k == 0:
            return []
        prev = np.empty(k, dtype=np.int64)
        prev[0] = times_ns[0] if self._last_ns is None else self._last_ns
        prev[1:] = times_ns[:-1]
        dt = times_ns - prev
        breaks = (dt > GAP_PERIODS * self._period_ns) | (dt <= 0)
        if self._last_ns is None:
            breaks[0] = False
        if discontinuity and self._last_ns is not None:
            breaks[0] = True
        self._stats.gaps += int(np.count_nonzero(breaks))
        self._last_ns = int(times_ns[-1])
        out: list[Captured] = []
        i = 0
        while i < k:
            if self._fill == 0:
                self._start_ns = int(times_ns[i])
                self._flag = False
            take = min(self.window - self._fill, k - i)
            self._buf[self._fill : self._fill + take] = samples[i : i + take]
            self._flag = self._flag or bool(breaks[i : i + take].any())
            self._fill += take
            i += take
            if self._fill == self.window:
                out.append(Captured(self._start_ns, self._buf.copy(), gap=self._flag))
                self._fill = 0
        return out
