"""What every sensor source yields (`Captured`) and the shape a source has (`Source`); see sources.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Captured:
    start_ns: int  # wall clock (Unix ns) of the first sample
    samples: F32 = field(repr=False)  # (window, axes) float32
    label: str | None = None  # the true state, when the source knows it (simulation); for audits only
    # The samples are not contiguous with the previous window (a gap, an overrun): live sources only.
    gap: bool = False


class Source(Protocol):
    kind: str
    sample_rate_hz: float
    window: int

    def windows(self) -> AsyncIterator[Captured]: ...
