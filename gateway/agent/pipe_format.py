"""The pipe source's wire formats. Pure and bounded. The byte layout and the CSV rules are specified in
docs/OPERATIONS.md, "Feeding the agent from a pipe" (writers implement it from there); HEADER below is
that table as a struct format.

A frame that fails a check is refused with a reason (REFUSE_REASONS) and the reader moves on: after a bad
header or CRC it looks for the next magic, so a torn frame costs only itself. A claimed sample count is
bounded (MAX_COUNT) before the reader waits for that many bytes, so the buffer never exceeds MAX_FRAME.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

MAGIC = b"SGWF"
VERSION = 1
AXES = 3
MAX_COUNT = 4096
MAX_CSV_LINE = 256
ENCODINGS: dict[int, np.dtype[np.generic]] = {1: np.dtype("<i2"), 2: np.dtype("<f4")}
HEADER = struct.Struct("<4sBBBBIffQI")  # magic version encoding axes flags count rate scale start seq
CRC = struct.Struct("<I")
MAX_FRAME = HEADER.size + MAX_COUNT * AXES * 4 + CRC.size

REFUSE_REASONS = (
    "bad_magic",
    "bad_version",
    "bad_encoding",
    "bad_axes",
    "bad_flags",
    "bad_count",
    "bad_crc",
    "bad_rate",
    "bad_scale",
    "bad_time",
    "non_finite",
    "csv_fields",
    "csv_number",
    "csv_too_long",
)


@dataclass(frozen=True, slots=True)
class Frame:
    seq: int
    start_ns: int
    samples: npt.NDArray[np.float32] = field(repr=False)  # (count, AXES), in g


def encode_frame(
    samples: npt.ArrayLike,
    *,
    seq: int,
    start_ns: int,
    sample_rate_hz: float,
    encoding: int = 2,
    scale: float = 1.0,
) -> bytes:
    """One frame; samples (count, 3) already in the encoding's raw units (what a writer sends)."""
    raw = np.ascontiguousarray(samples, dtype=ENCODINGS[encoding])
    if raw.ndim != 2 or raw.shape[1] != AXES or not 1 <= raw.shape[0] <= MAX_COUNT:
        raise ValueError(f"expected (1..{MAX_COUNT}, {AXES}) samples, got {raw.shape}")
    body = (
        HEADER.pack(
            MAGIC, VERSION, encoding, AXES, 0, raw.shape[0], sample_rate_hz, scale, start_ns, seq & 0xFFFFFFFF
        )
        + raw.tobytes()
    )
    return body + CRC.pack(zlib.crc32(body))


class FrameReader:
    """feed() bytes in any chunking; get back frames and refusal reasons in stream order."""

    def __init__(self, sample_rate_hz: float) -> None:
        self._rate = sample_rate_hz
        self._buf = bytearray()
        self._resyncing = False

    def feed(self, data: bytes) -> list[Frame | str]:
        self._buf += data
        out: list[Frame | str] = []
        while True:
            item = self._next()
            if item is None:
                return out
            out.append(item)

    def _skip(self, reason: str) -> str | None:
        """Drop to the next magic after the current position; one refusal per run of garbage."""
        nxt = self._buf.find(MAGIC, 1)
        del self._buf[: nxt if nxt > 0 else max(0, len(self._buf) - len(MAGIC) + 1)]
        counted = None if self._resyncing else reason
        self._resyncing = nxt <= 0
        return counted

    def _next(self) -> Frame | str | None:
        while True:
            if len(self._buf) < HEADER.size:
                if len(self._buf) >= len(MAGIC) and not self._buf.startswith(MAGIC):
                    reason = self._skip("bad_magic")
                    if reason is not None:
                        return reason
                    continue
                return None
            magic, version, enc, axes, flags, count, rate, scale, start, seq = HEADER.unpack_from(self._buf)
            reason = _header_reason(magic, version, enc, axes, flags=flags, count=count)
            if reason is not None:
                counted = self._skip(reason)
                if counted is not None:
                    return counted
                continue
            self._resyncing = False
            size = HEADER.size + count * AXES * ENCODINGS[enc].itemsize + CRC.size
            if len(self._buf) < size:
                return None
            frame = bytes(self._buf[:size])
            (crc,) = CRC.unpack_from(frame, size - CRC.size)
            if zlib.crc32(frame[: size - CRC.size]) != crc:
                counted = self._skip("bad_crc")
                if counted is not None:
                    return counted
                continue
            del self._buf[:size]
            return self._decode(frame, enc, count, rate=rate, scale=scale, start=start, seq=seq)

    def _decode(
        self, frame: bytes, enc: int, count: int, *, rate: float, scale: float, start: int, seq: int
    ) -> Frame | str:
        if not abs(rate - self._rate) <= 1e-6 * self._rate:
            return "bad_rate"
        if not (math.isfinite(scale) and scale > 0):
            return "bad_scale"
        if start == 0:
            return "bad_time"
        raw = np.frombuffer(frame, dtype=ENCODINGS[enc], count=count * AXES, offset=HEADER.size)
        samples = (raw.astype(np.float32) * np.float32(scale)).reshape(count, AXES)
        if not np.isfinite(samples).all():
            return "non_finite"
        return Frame(seq, start, samples)


def _header_reason(magic: bytes, version: int, enc: int, axes: int, *, flags: int, count: int) -> str | None:
    if magic != MAGIC:
        return "bad_magic"
    if version != VERSION:
        return "bad_version"
    if enc not in ENCODINGS:
        return "bad_encoding"
    if axes != AXES:
        return "bad_axes"
    if flags != 0:
        return "bad_flags"
    if not 1 <= count <= MAX_COUNT:
        return "bad_count"
    return None


class CsvReader:
    """feed() bytes; get back (t_ns, x, y, z) samples and refusal reasons, one per line."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._first = True
        self._overlong = False

    def feed(self, data: bytes) -> list[tuple[int, float, float, float] | str]:
        self._buf += data
        out: list[tuple[int, float, float, float] | str] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > MAX_CSV_LINE:
                    if not self._overlong:
                        out.append("csv_too_long")
                    self._overlong = True
                    self._buf.clear()
                return out
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if self._overlong:  # the rest of a line already refused
                self._overlong = False
                continue
            if len(line) > MAX_CSV_LINE:
                out.append("csv_too_long")
                continue
            item = self._line(line.decode("ascii", "replace").strip())
            if item is not None:
                out.append(item)

    def _line(self, text: str) -> tuple[int, float, float, float] | str | None:
        first, self._first = self._first, False
        if not text:
            return None
        parts = text.split(",")
        if first and parts[0].strip().lower().startswith("t"):
            return None  # header
        if len(parts) != 4:
            return "csv_fields"
        try:
            t, x, y, z = (float(p) for p in parts)
        except ValueError:
            return "csv_number"
        if not all(math.isfinite(v) for v in (t, x, y, z)):
            return "non_finite"
        if not 0 < t < 1e11:
            return "bad_time"
        return round(t * 1e9), x, y, z
