"""Commissioning: the agent learns its own machine's normal, then gates every window against it.

`CommissioningScorer` fits the agent's Scorer protocol (gateway/agent/service.py), so the filter loop
is unchanged: while commissioning it collects the feature vectors of the first `windows` windows and
scores every window 0.0 (never anomalous: no anomaly is forwarded before the machine's normal is known;
summaries continue as before). Then it fits a gateway.core.baseline.Baseline, calibrated to the target
false-forward rate, writes it atomically and scores each later window by its Mahalanobis distance.

Crash safety: the collected windows live in memory only and the baseline file is written to a temporary
file, fsynced and renamed over the old one, then the directory is fsynced. A SIGKILL during collection
or fitting therefore leaves either no file (the next start commissions afresh) or a whole earlier one,
never half a baseline. A file that is damaged or was fitted for other features is refused with one line
naming it (logged), and the agent commissions again.

`recommission()` is the entry point for re-commissioning after maintenance (the CLI's --commission now,
a remote command once the downlink lands).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt

from gateway.core import baseline as core
from gateway.errors import SgwError
from gateway.inference import features

log = logging.getLogger("sgw.agent.baseline")
# a 1024-feature baseline (core.from_bytes's bound) is 8.4 MB; anything larger is not one of ours
MAX_BYTES = 16 << 20


class BaselineFileError(SgwError):
    """A baseline file that cannot be used; the message names the file and why."""


def load(path: Path, feature_set: str = features.ORDER_SET) -> core.Baseline | None:
    """The stored baseline, None if there is none; BaselineFileError if it is damaged or mismatched."""
    try:
        with path.open("rb") as fh:
            blob = fh.read(MAX_BYTES + 1)  # bounded before use: the file is outside our control
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BaselineFileError(f"baseline {path}: cannot read: {exc.strerror or exc}") from None
    if len(blob) > MAX_BYTES:
        raise BaselineFileError(f"baseline {path}: refused: larger than {MAX_BYTES} bytes")
    try:
        return core.from_bytes(blob, feature_set)
    except core.BaselineError as exc:
        raise BaselineFileError(f"baseline {path}: refused: {exc}") from None


def save(path: Path, b: core.Baseline) -> None:
    """Atomic replace: temp file, fsync, rename, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, b.to_bytes())
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class CommissioningScorer:
    """Scorer: collect `windows` healthy windows, fit and persist, then score by baseline distance."""

    def __init__(self, path: Path, *, windows: int = 300, target_rate: float = 0.01,
                 sample_rate_hz: float = 1600.0) -> None:
        self.path = path
        self.windows = int(windows)
        self.target_rate = float(target_rate)
        self.sample_rate_hz = float(sample_rate_hz)
        self._collected: list[npt.NDArray[np.float32]] = []
        try:
            self.baseline = load(path)
        except BaselineFileError as exc:
            log.warning("%s; commissioning again", exc)  # one line, no trace
            self.baseline = None
        if self.baseline is None:
            log.info("commissioning: collecting %d windows of this machine's normal", self.windows)

    @property
    def commissioning(self) -> bool:
        return self.baseline is None

    @property
    def baseline_threshold(self) -> float:
        """The distance over which a window is forwarded as an anomaly; 0.0 while commissioning. Sent in
        every window beside its distance, so results can say how far from its normal a window was."""
        return self.baseline.threshold if self.baseline is not None else 0.0

    @property
    def progress(self) -> float:
        """0..1 while commissioning, 1.0 once a baseline is in force."""
        return 1.0 if self.baseline is not None else len(self._collected) / self.windows

    def recommission(self) -> None:
        """Forget the baseline (file included) and learn the machine's normal again from the next window."""
        self.baseline = None
        self._collected.clear()
        self.path.unlink(missing_ok=True)
        log.info("re-commissioning: collecting %d windows", self.windows)

    def score(self, window: npt.ArrayLike) -> float:
        f = features.extract_for_baseline(window, self.sample_rate_hz)
        if self.baseline is not None:
            return float(self.baseline.distance(f)[0])
        self._collected.append(f[0])
        if len(self._collected) >= self.windows:
            self.baseline = core.fit(np.stack(self._collected), features.ORDER_SET,
                                     target_rate=self.target_rate)
            save(self.path, self.baseline)
            self._collected.clear()
            log.info("commissioned: baseline from %d windows, threshold %.3f, written to %s",
                     self.baseline.n_windows, self.baseline.threshold, self.path)
        return 0.0

    def is_anomalous(self, score: float) -> bool:
        return self.baseline is not None and score > self.baseline.threshold
