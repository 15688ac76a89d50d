"""Sensor sources: anything that yields fixed-size windows of samples with their capture time.

Linux IIO accelerometers (iio.py) and programs writing to a FIFO or stdin (pipe.py) need no code: they
are `source.type` values. Adding another driver (a serial accelerometer, say) means writing one class
with this shape and naming it in `make_source`; the filter, sealing, outbox and MQTT parts never change:

    class MyDriver:
        kind = "vibration"
        sample_rate_hz = 1600.0
        window = 128

        async def windows(self) -> AsyncIterator[Captured]:
            while True:
                samples = await read_128_samples()         # float32 (window, axes) in the sensor's unit
                yield Captured(start_ns=first_sample_unix_ns, samples=samples)

Rules a driver must keep: block the event loop only briefly (run a blocking read with
`asyncio.to_thread`), timestamp the first sample with the wall clock in Unix ns, yield float32 arrays of
exactly (window, axes), and end the iterator when the sensor is gone for good (the agent then flushes and
exits). See docs/OPERATIONS.md, "Adding a sensor".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from gateway.agent.capture import Captured, Source
from gateway.agent.config import SourceSection
from gateway.agent.iio import IioSource
from gateway.agent.pipe import PipeSource
from gateway.agent.resample import ResampledSource
from gateway.errors import ConfigError
from gateway.sim.generator import Machine

__all__ = ["Captured", "ReplaySource", "SimulatedSource", "Source", "load_recording", "make_source"]


class _Pacer:
    """Sleeps until window i is due: real time divided by `speed`; speed 0 never sleeps.

    Deadlines are absolute (start + i * period), so scheduling jitter does not accumulate as drift.
    """

    def __init__(self, period_s: float, speed: float) -> None:
        self._period = period_s / speed if speed > 0 else 0.0
        self._t0 = time.monotonic()
        self._wall0 = time.time_ns()

    def start_ns(self, index: int) -> int:
        """Capture time of window `index`: paced sources anchor to the start, unpaced ones are 'now'."""
        if self._period == 0.0:
            return time.time_ns()
        return self._wall0 + int(index * self._period * 1e9)

    async def wait(self, index: int) -> None:
        if self._period == 0.0:
            # Still yield, so an unpaced source cannot starve the publisher and the signal handlers.
            await asyncio.sleep(0)
            return
        delay = self._t0 + (index + 1) * self._period - time.monotonic()  # a window is ready once full
        if delay > 0:
            await asyncio.sleep(delay)


class SimulatedSource:
    """The shared generator's Machine with the configured fault schedule (times in machine seconds)."""

    def __init__(self, *, seed: int, sample_rate_hz: float, window: int, speed: float,
                 faults: Sequence[tuple[float, float, str]] = (), kind: str = "vibration",
                 max_windows: int | None = None) -> None:
        self.kind = kind
        self.sample_rate_hz = sample_rate_hz
        self.window = window
        self._machine = Machine(seed, sample_rate_hz, window, schedule=faults)
        self._speed = speed
        self._max = max_windows

    async def windows(self) -> AsyncIterator[Captured]:
        period = self.window / self.sample_rate_hz
        pacer = _Pacer(period, self._speed)
        i = 0
        while self._max is None or i < self._max:
            t_s = i * period
            await pacer.wait(i)
            samples, label = self._machine.next_window(t_s)
            yield Captured(pacer.start_ns(i), samples, label)
            i += 1


class ReplaySource:
    """A recording (.npy of shape (n, axes), or .csv with one row per sample) cut into windows.

    .npy files are memory-mapped, so a long recording costs no memory; a .csv is parsed whole (keep CSV
    recordings small, or convert them once with numpy.save). A trailing partial window is not sent.
    """

    def __init__(self, *, path: Path, sample_rate_hz: float, window: int, speed: float,
                 kind: str = "vibration", max_windows: int | None = None) -> None:
        self.kind = kind
        self.sample_rate_hz = sample_rate_hz
        self.window = window
        self._data = load_recording(path)
        self.axes = int(self._data.shape[1])
        self._speed = speed
        self._max = max_windows

    @property
    def total_windows(self) -> int:
        return int(self._data.shape[0] // self.window)

    async def windows(self) -> AsyncIterator[Captured]:
        pacer = _Pacer(self.window / self.sample_rate_hz, self._speed)
        n = self.total_windows if self._max is None else min(self.total_windows, self._max)
        for i in range(n):
            await pacer.wait(i)
            chunk = np.ascontiguousarray(self._data[i * self.window:(i + 1) * self.window], dtype=np.float32)
            yield Captured(pacer.start_ns(i), chunk)


def load_recording(path: Path) -> npt.NDArray[np.float32]:
    """(n, axes) float32 from .npy (memory-mapped) or .csv (a header row of names is skipped)."""
    try:
        if path.suffix.lower() == ".npy":
            data = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            with path.open("r", encoding="utf-8") as fh:
                first = fh.readline()
                skip = 0 if _numeric_row(first) else 1
            data = np.loadtxt(path, delimiter=",", dtype=np.float32, skiprows=skip, ndmin=2)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"source.path: cannot read recording {path}: {exc}") from None
    if data.ndim != 2 or data.shape[1] < 1 or data.shape[0] < 1:
        raise ConfigError(f"source.path: expected samples shaped (n, axes), {path} holds {data.shape}")
    if not np.issubdtype(data.dtype, np.number):
        raise ConfigError(f"source.path: {path} does not hold numbers ({data.dtype})")
    return data  # type: ignore[no-any-return]


def _numeric_row(line: str) -> bool:
    try:
        [float(v) for v in line.split(",")]
    except ValueError:
        return False
    return True


def make_source(cfg: SourceSection, *, kind: str, max_windows: int | None = None) -> Source:
    """The configured source, resampled when `resample_hz` asks for another rate than the sensor's."""
    source = _driver(cfg, kind=kind, max_windows=max_windows)
    if cfg.resample_hz and cfg.resample_hz != cfg.sample_rate_hz:
        return ResampledSource(source, cfg.resample_hz)
    return source


def _driver(cfg: SourceSection, *, kind: str, max_windows: int | None) -> Source:
    """A new driver type gets its branch here (and a `source.type` value)."""
    if cfg.type == "simulated":
        faults = [(f.at_s, f.duration_s, f.fault) for f in cfg.faults]
        return SimulatedSource(seed=cfg.seed, sample_rate_hz=cfg.sample_rate_hz, window=cfg.window,
                               speed=cfg.speed, faults=faults, kind=kind, max_windows=max_windows)
    if cfg.type == "iio":
        return IioSource(device=cfg.device, channels=cfg.channels, sample_rate_hz=cfg.sample_rate_hz,
                         window=cfg.window, sysfs_root=cfg.sysfs_root, dev_root=cfg.dev_root,
                         buffer_length=cfg.buffer_length, trigger=cfg.trigger, kind=kind,
                         max_windows=max_windows)
    if cfg.type == "pipe":
        return PipeSource(path=cfg.path, fmt=cfg.format, sample_rate_hz=cfg.sample_rate_hz,
                          window=cfg.window, kind=kind, max_windows=max_windows)
    return ReplaySource(path=cfg.path, sample_rate_hz=cfg.sample_rate_hz, window=cfg.window,
                        speed=cfg.speed, kind=kind, max_windows=max_windows)
