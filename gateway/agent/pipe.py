"""`[source] type = "pipe"`: samples from another program through a FIFO or stdin (format: pipe_format.py).

A FIFO outlives its writers (streams.py opens it read-write), so the acquisition program may restart at
will; stdin or a regular file ends the source at end of file. Refused frames and lines are counted by
reason in `stats` and logged (rate-limited to one line per reason per minute); the agent keeps running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from gateway.agent import pipe_format
from gateway.agent.capture import Captured
from gateway.agent.streams import open_stream, read_some
from gateway.agent.windowing import SourceStats, Windower
from gateway.errors import SourceError

log = logging.getLogger("sgw.agent.pipe")

Batch = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], bool]  # samples, times, gap before

READ_BYTES = 1 << 16
LOG_EVERY_S = 60.0


class PipeSource:
    def __init__(
        self,
        *,
        path: Path,
        fmt: Literal["frames", "csv"],
        sample_rate_hz: float,
        window: int,
        kind: str = "vibration",
        max_windows: int | None = None,
    ) -> None:
        self.kind = kind
        self.sample_rate_hz = sample_rate_hz
        self.window = window
        self.axes = pipe_format.AXES
        self.stats = SourceStats()
        self._format = fmt
        self._max = max_windows
        self._path = Path("-") if path == Path() else path
        self._logged: dict[str, float] = {}
        try:
            self._fd = open_stream(self._path)
        except PermissionError:
            raise SourceError(
                f"source.path: permission denied opening {self._path} (a FIFO is opened read-write, so the "
                "agent needs both)"
            ) from None
        except OSError as exc:
            raise SourceError(f"source.path: cannot open {self._path}: {exc.strerror or exc}") from None

    def _refuse(self, reason: str) -> None:
        self.stats.refuse(reason)
        now = time.monotonic()
        if now - self._logged.get(reason, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._logged[reason] = now
            log.warning(
                "pipe input refused",
                extra={
                    "fields": {
                        "reason": reason,
                        "refused": self.stats.refused[reason],
                        "path": str(self._path),
                    }
                },
            )

    async def windows(self) -> AsyncIterator[Captured]:
        windower = Windower(
            window=self.window, axes=self.axes, sample_rate_hz=self.sample_rate_hz, stats=self.stats
        )
        sent = 0
        try:
            batches = self._frames() if self._format == "frames" else self._csv()
            async with contextlib.aclosing(batches):
                async for samples, times, jump in batches:
                    for captured in windower.push(samples, times, discontinuity=jump):
                        yield captured
                        sent += 1
                        if self._max is not None and sent >= self._max:
                            return
            log.info("pipe ended", extra={"fields": {"path": str(self._path)}})
        finally:
            os.close(self._fd)

    async def _frames(self) -> AsyncGenerator[Batch]:
        reader = pipe_format.FrameReader(self.sample_rate_hz)
        period_ns = 1e9 / self.sample_rate_hz
        next_seq: int | None = None
        while data := await read_some(self._fd, READ_BYTES):
            for item in reader.feed(data):
                if isinstance(item, str):
                    self._refuse(item)
                    continue
                jump = next_seq is not None and item.seq != next_seq
                next_seq = (item.seq + 1) & 0xFFFFFFFF
                n = item.samples.shape[0]
                times = item.start_ns + np.round(np.arange(n) * period_ns).astype(np.int64)
                yield item.samples, times, jump

    async def _csv(self) -> AsyncGenerator[Batch]:
        reader = pipe_format.CsvReader()
        while data := await read_some(self._fd, READ_BYTES):
            rows: list[tuple[int, float, float, float]] = []
            for item in reader.feed(data):
                if isinstance(item, str):
                    self._refuse(item)
                else:
                    rows.append(item)
            if rows:
                arr = np.array([r[1:] for r in rows], dtype=np.float32)
                yield arr, np.array([r[0] for r in rows], dtype=np.int64), False
