"""`[source] type = "iio"`: buffered capture from a Linux Industrial I/O accelerometer.

Setup (all in the constructor, so a wrong device fails `sgw agent` before it connects): find the device by
name or number under the sysfs root, enable exactly the configured accel channels (and the timestamp when
the device has one) in scan_elements/, read each channel's `_type`, `_index`, `_scale`, `_offset`, set the
sampling frequency and buffer length, and open /dev/iio:deviceN. Each sysfs value is written only when it
differs, so a device configured beforehand (udev rule, ExecStartPre=+) needs no write access from the agent.
`windows()` enables the buffer, reads whole scans and disables it again on the way out.

Timestamps: the IIO timestamp channel when present (its clock set to realtime), else the wall clock at
each read, stepped back by the rate. Overruns: a read that returns a full kernel buffer means the driver
had nowhere to put the next scans. Both, and any other break in the sample clock, are counted in `stats`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np

from gateway.agent import iio_layout
from gateway.agent.capture import Captured
from gateway.agent.streams import open_stream, read_some
from gateway.agent.windowing import SourceStats, Windower
from gateway.errors import SourceError

log = logging.getLogger("sgw.agent.iio")

# Without a timestamp channel, a read this far off the running sample clock re-anchors it.
CLOCK_TOLERANCE_NS = 50_000_000
_NUMBER = re.compile(r"(?:iio:device)?(\d{1,4})")
MAX_ATTR_BYTES = 4096


def _read_attr(path: Path) -> str:
    with path.open("rb") as fh:
        return fh.read(MAX_ATTR_BYTES).decode("ascii", "replace").strip()


def device_allow_line(node: Path) -> str:
    return f"DeviceAllow={node} r"


class _RefusedError(SourceError):
    """The driver refused a value (EINVAL and the like), as opposed to the agent lacking permission."""


class IioDevice:
    """One device's sysfs directory: lookups and write-if-different, every failure a SourceError."""

    def __init__(self, root: Path, name: str) -> None:
        self.dir = root / name
        self.name = name
        try:
            self.label = _read_attr(self.dir / "name")
        except OSError:
            self.label = name

    def attr(self, *candidates: str) -> Path | None:
        """The first candidate attribute file that exists (per-channel before shared-by-type)."""
        for cand in candidates:
            p = self.dir / cand
            if p.is_file():
                return p
        return None

    def read(self, path: Path) -> str:
        try:
            return _read_attr(path)
        except OSError as exc:
            raise SourceError(f"source: cannot read {path}: {exc.strerror or exc}") from None

    def write(self, path: Path, value: str) -> bool:
        """Writes value unless the file already holds it; True if it wrote."""
        if self.read(path) == value:
            return False
        try:
            path.write_text(value + "\n", encoding="ascii")
        except PermissionError:
            raise SourceError(
                f"source: permission denied writing {value!r} to {path}; configure the device before the "
                "agent starts (docs/OPERATIONS.md, 'Adding a sensor')"
            ) from None
        except OSError as exc:
            raise _RefusedError(
                f"source: {self.label} refused {value!r} in {path}: {exc.strerror or exc}"
            ) from None
        return True


def find_device(root: Path, device: str) -> IioDevice:
    """'adxl355' (the `name` attribute), '0' or 'iio:device0'; a clear error lists what is there."""
    found = sorted(p.name for p in root.glob("iio:device*")) if root.is_dir() else []
    devices = [IioDevice(root, n) for n in found]
    m = _NUMBER.fullmatch(device)
    matches = (
        [d for d in devices if d.name == f"iio:device{m.group(1)}"]
        if m
        else [d for d in devices if d.label == device]
    )
    if len(matches) == 1:
        return matches[0]
    have = ", ".join(f"{d.label} ({d.name})" for d in devices) or "none"
    if not matches:
        raise SourceError(f"source.device: no IIO device {device!r} under {root} (found: {have})")
    raise SourceError(
        f"source.device: {len(matches)} IIO devices are named {device!r} ({have}); give its number instead"
    )


def _channel(dev: IioDevice, name: str) -> iio_layout.Channel:
    scan = dev.dir / "scan_elements"
    prefix = f"in_{name}"
    if not (scan / f"{prefix}_en").is_file():
        have = sorted(p.name[3:-3] for p in scan.glob("in_*_en")) if scan.is_dir() else []
        raise SourceError(
            f"source.channels: {dev.label} has no buffered channel {name!r} "
            f"(has: {', '.join(have) or 'none'})"
        )
    type_text = dev.read(scan / f"{prefix}_type")
    try:
        scan_type = iio_layout.parse_type(type_text)
    except iio_layout.ScanFormatError as exc:
        raise SourceError(f"source.channels: {dev.label} {name}: {exc}") from None
    if scan_type.repeat != 1:
        raise SourceError(
            f"source.channels: {dev.label} {name}: unsupported channel type {type_text!r} (repeated values)"
        )
    index = _int(dev, scan / f"{prefix}_index")
    kind = name.split("_", 1)[0]
    if name == "timestamp":
        return iio_layout.Channel(name, index, scan_type)
    scale_path = dev.attr(f"{prefix}_scale", f"in_{kind}_scale")
    if scale_path is None:
        raise SourceError(f"source.channels: {dev.label} {name} has no _scale, so its unit is unknown")
    offset_path = dev.attr(f"{prefix}_offset", f"in_{kind}_offset")
    scale = _float(dev, scale_path)
    offset = _float(dev, offset_path) if offset_path else 0.0
    return iio_layout.Channel(name, index, scan_type, scale, offset)


def _float(dev: IioDevice, path: Path) -> float:
    text = dev.read(path)
    try:
        value = float(text)
    except ValueError:
        raise SourceError(f"source: {path} holds {text!r}, not a number") from None
    if not math.isfinite(value):
        raise SourceError(f"source: {path} holds {text!r}")
    return value


def _int(dev: IioDevice, path: Path) -> int:
    text = dev.read(path)
    if not text.isdigit() or len(text) > 6:
        raise SourceError(f"source: {path} holds {text!r}, not an index")
    return int(text)


def _available(text: str) -> tuple[list[float], tuple[float, float] | None]:
    """'4000 2000 1000' -> ([...], None); the range form '[min step max]' -> ([], (min, max))."""
    if text.startswith("["):
        parts = text.strip("[]").split()
        if len(parts) == 3:
            with contextlib.suppress(ValueError):
                return [], (float(parts[0]), float(parts[2]))
        return [], None
    values = []
    for part in text.split():
        with contextlib.suppress(ValueError):
            values.append(float(part))
    return values, None


def _same_rate(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(abs(a), abs(b)) + 1e-6


class IioSource:
    """Windows of accel samples in g from one IIO device's buffer."""

    def __init__(
        self,
        *,
        device: str,
        channels: Sequence[str],
        sample_rate_hz: float,
        window: int,
        sysfs_root: Path = Path("/sys/bus/iio/devices"),
        dev_root: Path = Path("/dev"),
        buffer_length: int = 0,
        trigger: str = "",
        kind: str = "vibration",
        max_windows: int | None = None,
    ) -> None:
        self.kind = kind
        self.sample_rate_hz = sample_rate_hz
        self.window = window
        self.axes = len(channels)
        self.stats = SourceStats()
        self._max = max_windows
        dev = self.device = find_device(sysfs_root, device)
        self.node = dev_root / dev.name
        if not self.node.exists():
            raise SourceError(
                f"source.device: {dev.label} ({dev.name}) has no device node {self.node}; "
                "is the driver bound and devtmpfs mounted?"
            )
        data = [_channel(dev, c) for c in channels]
        scan = dev.dir / "scan_elements"
        ts = _channel(dev, "timestamp") if (scan / "in_timestamp_en").is_file() else None
        try:
            self.layout = iio_layout.layout(data, ts)
        except iio_layout.ScanFormatError as exc:
            raise SourceError(f"source.channels: {dev.label}: {exc}") from None
        self.has_timestamp = ts is not None
        self._configure(
            scan,
            {c.name for c in data} | ({"timestamp"} if ts else set()),
            trigger,
            buffer_length or 8 * window,
        )
        try:
            self._fd = open_stream(self.node)
        except PermissionError:
            raise SourceError(
                f"source.device: permission denied opening {self.node}; the systemd unit needs "
                f"`{device_allow_line(self.node)}` (and PrivateDevices=no), see docs/OPERATIONS.md"
            ) from None
        except OSError as exc:
            raise SourceError(f"source.device: cannot open {self.node}: {exc.strerror or exc}") from None

    def _configure(self, scan: Path, wanted: set[str], trigger: str, length: int) -> None:
        dev = self.device
        enable = dev.dir / "buffer" / "enable"
        if not enable.is_file():
            raise SourceError(f"source.device: {dev.label} ({dev.name}) has no buffer/ (not buffered)")
        rate_path = self._rate_attr()
        length_path = dev.dir / "buffer" / "length"
        plan = [(en, "1" if en.name[3:-3] in wanted else "0") for en in sorted(scan.glob("in_*_en"))]
        clock = dev.attr("current_timestamp_clock")
        if self.has_timestamp and clock is not None:
            plan.append((clock, "realtime"))  # window start_ns is Unix time
        if trigger:
            plan.append((dev.dir / "trigger" / "current_trigger", trigger))
        plan.append((length_path, str(length)))
        watermark = dev.attr("buffer/watermark")
        if watermark is not None:
            plan.append((watermark, str(max(1, min(self.window, length // 2)))))  # wake once per window
        todo = [(path, value) for path, value in plan if dev.read(path) != value]
        set_rate = not _same_rate(_float(dev, rate_path), self.sample_rate_hz)
        self.running_before = dev.read(enable) != "0"  # set up and started beforehand (ExecStartPre=+)
        if self.running_before and (todo or set_rate):
            dev.write(enable, "0")  # scan elements, rate and length cannot change while the buffer runs
            self.running_before = False
        if set_rate:
            self._write_rate(rate_path)
        for path, value in todo:
            try:
                dev.write(path, value)
            except _RefusedError:
                if path != length_path:
                    raise
                log.warning("driver kept its own buffer length", extra={"fields": {"wanted": value}})
        self.buffer_length = _int(dev, length_path)
        if self.buffer_length < 1:
            raise SourceError(f"source.buffer_length: {dev.label} has a buffer of {self.buffer_length} scans")

    def _rate_attr(self) -> Path:
        """The sampling frequency attribute, once the configured rate is known to be one it offers."""
        dev, rate = self.device, self.sample_rate_hz
        path = dev.attr("in_accel_sampling_frequency", "sampling_frequency")
        if path is None:
            raise SourceError(f"source.sample_rate_hz: {dev.label} has no sampling_frequency to set")
        avail_path = dev.attr(path.name + "_available")
        if avail_path is not None:
            values, span = _available(dev.read(avail_path))
            ok = (
                any(_same_rate(rate, v) for v in values)
                if values
                else span is None or span[0] <= rate <= span[1]
            )
            if not ok:
                offer = (
                    " ".join(f"{v:g}" for v in values)
                    if values
                    else f"{span[0]:g}..{span[1]:g}"
                    if span
                    else "?"
                )
                raise SourceError(
                    f"source.sample_rate_hz: {dev.label} cannot sample at {rate:g} Hz (it offers {offer})"
                )
        return path

    def _write_rate(self, path: Path) -> None:
        dev, rate = self.device, self.sample_rate_hz
        try:
            dev.write(path, f"{rate:g}")
        except _RefusedError as exc:
            raise SourceError(
                f"source.sample_rate_hz: {dev.label} cannot sample at {rate:g} Hz ({exc})"
            ) from None
        got = _float(dev, path)
        if not _same_rate(got, rate):
            raise SourceError(
                f"source.sample_rate_hz: {dev.label} cannot sample at {rate:g} Hz (it set {got:g})"
            )

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    async def windows(self) -> AsyncIterator[Captured]:
        enable = self.device.dir / "buffer" / "enable"
        lay = self.layout
        windower = Windower(
            window=self.window, axes=self.axes, sample_rate_hz=self.sample_rate_hz, stats=self.stats
        )
        period_ns = 1e9 / self.sample_rate_hz
        limit = self.buffer_length * lay.scan_bytes
        pending = bytearray()
        next_ns: int | None = None  # the sample clock without a timestamp channel
        lost = False
        sent = 0
        try:
            if not self.running_before:
                self.device.write(enable, "1")
            while self._max is None or sent < self._max:
                try:
                    data = await read_some(self._fd, limit)
                except OSError as exc:
                    if exc.errno != errno.ENODEV:
                        raise SourceError(f"source: reading {self.node}: {exc.strerror or exc}") from None
                    data = b""
                if not data:
                    log.warning("IIO device gone", extra={"fields": {"device": self.device.name}})
                    return
                pending += data
                whole = len(pending) // lay.scan_bytes * lay.scan_bytes
                if whole == 0:
                    continue
                scans = iio_layout.decode(bytes(pending[:whole]), lay)
                del pending[:whole]
                k = scans.values.shape[0]
                if scans.timestamps is not None:
                    times = scans.timestamps
                else:
                    est = time.time_ns() - round((k - 1) * period_ns)
                    if next_ns is None or abs(est - next_ns) > CLOCK_TOLERANCE_NS:
                        next_ns = est
                    times = next_ns + np.round(np.arange(k) * period_ns).astype(np.int64)
                    next_ns = int(times[-1] + round(period_ns))
                for captured in windower.push(iio_layout.to_g(scans.values), times, discontinuity=lost):
                    yield captured
                    sent += 1
                    if self._max is not None and sent >= self._max:
                        return
                lost = len(data) >= limit  # the kernel buffer was full: the scans after these were dropped
                if lost:
                    self.stats.overruns += 1
        finally:
            if not self.running_before:  # leave a buffer someone else started running
                with contextlib.suppress(SourceError):
                    self.device.write(enable, "0")
            self.close()
