"""A model switch on probation, kept on disk so that a crash cannot hide it, and the agent's self-test.

Before the agent switches to a new release it writes, fsynced, beside the model store's links:

    <store>/selftest.npy              the last windows the running release kept as healthy (not forwarded)
    <store>/prefilter.pending.json    the switch: to which release, from which version, starts since

Then it switches. The switch is confirmed (the pending file removed) once the new release has scored
[model] probation_windows live windows and passed the self-test. Until then every start of the agent
counts itself in the pending file first; a start finds the switch unconfirmed and goes back to the
release that ran before (gateway/agent/models.py) when the new one no longer loads or fits, fails the
self-test, or the agent has started max_unconfirmed_starts times on it without confirming (it crashes).

The self-test: the new release scores the kept windows and may forward at most selftest_max_forward of
them. Measured on the simulator (5 machines x 1,000 healthy windows, the kept ones those the shipped
prefilter did not forward): the shipped prefilter's own quality curve at its most sensitive threshold
(10x its healthy forward rate) forwards 2.2 % of them, 12.5 % in the worst block of 64; a release that
forwards everything forwards 100 %. 0.25 is twice that worst block. Fewer than MIN_SELFTEST_WINDOWS kept
windows (a device that switched right after it started) cannot judge: the test passes, saying so.
"""

from __future__ import annotations

import io
import json
import logging
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from gateway.inference.engine import Prefilter
from gateway.pki.files import write_atomic

log = logging.getLogger("sgw.agent.models")

HEALTHY_FILE = "selftest.npy"
MIN_SELFTEST_WINDOWS = 16
ANY_FOLDER = "*"  # a pending record that could not be read: whatever is active is on probation


@dataclass
class Pending:
    """A switch not yet confirmed. `folder` is the new release's folder name under releases/."""

    to_version: str
    from_version: str
    folder: str
    starts: int = 0


@dataclass(frozen=True)
class RolledBack:
    """The last rollback the agent made by itself (reported in DeviceStatus until the next switch)."""

    from_version: str
    to_version: str
    reason: str
    detail: str


@dataclass(frozen=True)
class SelfTest:
    windows: int
    forwarded: int
    max_forward: float

    @property
    def judged(self) -> bool:
        return self.windows >= MIN_SELFTEST_WINDOWS

    @property
    def ok(self) -> bool:
        return not self.judged or self.forwarded <= self.max_forward * self.windows

    def describe(self) -> str:
        if not self.judged:
            return f"not judged: {self.windows} healthy windows kept, {MIN_SELFTEST_WINDOWS} needed"
        return (f"forwards {self.forwarded} of {self.windows} healthy windows "
                f"(at most {self.max_forward:.0%} allowed)")


class ProbationFiles:
    """The pending switch, the last automatic rollback and the kept windows of one model in a store."""

    def __init__(self, root: Path, model: str) -> None:
        self.pending_path = root / f"{model}.pending.json"
        self.rolled_back_path = root / f"{model}.rolled_back.json"
        self.healthy_path = root / HEALTHY_FILE

    def pending(self) -> Pending | None:
        try:
            return Pending(**json.loads(self.pending_path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            # unreadable: the active release cannot prove it was confirmed, so it is judged again
            log.error("model probation record unreadable", extra={"fields": {"error": str(exc)}})  # noqa: TRY400
            return Pending("?", "?", ANY_FOLDER)

    def write_pending(self, pending: Pending) -> None:
        write_atomic(self.pending_path, json.dumps(asdict(pending)).encode(), fsync=True)

    def clear_pending(self) -> None:
        self.pending_path.unlink(missing_ok=True)

    def rolled_back(self) -> RolledBack | None:
        try:
            return RolledBack(**json.loads(self.rolled_back_path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def write_rolled_back(self, what: RolledBack | None) -> None:
        if what is None:
            self.rolled_back_path.unlink(missing_ok=True)
        else:
            write_atomic(self.rolled_back_path, json.dumps(asdict(what)).encode(), fsync=True)

    def save_healthy(self, windows: list[npt.NDArray[np.float32]]) -> None:
        if not windows:
            self.healthy_path.unlink(missing_ok=True)
            return
        buf = io.BytesIO()
        np.save(buf, np.stack(windows).astype(np.float32), allow_pickle=False)
        write_atomic(self.healthy_path, buf.getvalue(), mode=0o600, fsync=True)

    def load_healthy(self) -> npt.NDArray[np.float32] | None:
        try:
            data = np.load(self.healthy_path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        return data.astype(np.float32) if data.ndim == 3 else None


class HealthyWindows:
    """The last N windows the running release did not forward: the self-test's input at the next switch."""

    def __init__(self, size: int) -> None:
        self._ring: deque[npt.NDArray[np.float32]] = deque(maxlen=size)

    def add(self, samples: npt.ArrayLike) -> None:
        self._ring.append(np.array(samples, dtype=np.float32, copy=True))

    def snapshot(self) -> list[npt.NDArray[np.float32]]:
        return list(self._ring)

    def clear(self) -> None:
        self._ring.clear()


def selftest(prefilter: Prefilter, windows: npt.NDArray[np.float32] | None, max_forward: float) -> SelfTest:
    """Scores the kept windows with `prefilter`; windows of another shape (a release for another window
    length) are not judged here: fits() refuses that release first."""
    if windows is None or windows.shape[1:] != prefilter.model.window_shape:
        return SelfTest(0, 0, max_forward)
    forwarded = sum(1 for w in windows if prefilter.is_anomalous(prefilter.score(w)))
    return SelfTest(len(windows), forwarded, max_forward)
