"""Linux IIO buffer scans: parse scan element `_type` strings and decode raw buffer bytes. Pure numpy.

The kernel (drivers/iio/industrialio-buffer.c, Documentation/ABI/testing/sysfs-bus-iio) writes one scan per
trigger: the enabled channels in `_index` order, each aligned to its own storage size, the timestamp
(`le:s64/64>>0`, ns) last, and the whole scan padded to a multiple of its largest element. A `_type` reads
`[be|le]:[s|u]<bits>/<storagebits>[X<repeat>]>><shift>`: the value is `bits` wide, `shift` bits up from the
bottom of a `storagebits` word stored in that byte order. Physical value = (raw + offset) * scale.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

STANDARD_GRAVITY = 9.80665  # m/s^2 per g; IIO accel scales are m/s^2 per LSB
MAX_REPEAT = 64
MAX_SCAN_BYTES = 4096  # far above any real device; bounds what one scan may claim

_TYPE = re.compile(r"(be|le):([su])(\d{1,2})/(\d{1,2})(?:X(\d{1,3}))?>>(\d{1,2})")


class ScanFormatError(ValueError):
    """A `_type` string or channel set this decoder cannot handle; the message says which part."""


@dataclass(frozen=True, slots=True)
class ScanType:
    big_endian: bool
    signed: bool
    bits: int
    storage_bits: int
    shift: int
    repeat: int = 1

    @property
    def storage_bytes(self) -> int:
        return self.storage_bits // 8

    @property
    def length(self) -> int:
        """Bytes the channel takes in a scan (and its alignment): storage size times repeat."""
        return self.storage_bytes * self.repeat


def parse_type(text: str) -> ScanType:
    """'le:s16/16>>0' -> ScanType; anything else (float channels, odd sizes) is a ScanFormatError."""
    m = _TYPE.fullmatch(text.strip())
    if m is None:
        raise ScanFormatError(f"unsupported scan type {text.strip()!r} (expected e.g. le:s16/16>>0)")
    endian, sign, bits_s, storage_s, repeat_s, shift_s = m.groups()
    bits, storage, shift = int(bits_s), int(storage_s), int(shift_s)
    repeat = int(repeat_s) if repeat_s else 1
    if storage not in (8, 16, 32, 64):
        raise ScanFormatError(f"unsupported scan type {text.strip()!r}: storage of {storage} bits")
    if not 1 <= bits <= storage or shift + bits > storage:
        raise ScanFormatError(f"unsupported scan type {text.strip()!r}: {bits} bits >> {shift} in {storage}")
    if not 1 <= repeat <= MAX_REPEAT or repeat & (repeat - 1):
        # The kernel aligns each element to its whole length with a power-of-two mask.
        raise ScanFormatError(f"unsupported scan type {text.strip()!r}: repeat {repeat}")
    return ScanType(endian == "be", sign == "s", bits, storage, shift, repeat)


@dataclass(frozen=True, slots=True)
class Channel:
    name: str  # e.g. "accel_x", "timestamp"
    index: int  # the `_index` value: position in the scan
    type: ScanType
    scale: float = 1.0
    offset: float = 0.0


@dataclass(frozen=True, slots=True)
class Layout:
    channels: tuple[Channel, ...]  # enabled channels in `_index` order, timestamp excluded
    offsets: tuple[int, ...]  # byte offset of each channel in the scan
    timestamp_offset: int | None  # byte offset of the s64 timestamp, None when it is not enabled
    scan_bytes: int


TIMESTAMP_TYPE = ScanType(big_endian=False, signed=True, bits=64, storage_bits=64, shift=0)


def layout(channels: Sequence[Channel], timestamp: Channel | None = None) -> Layout:
    """Byte offsets as the kernel computes them (iio_compute_scan_bytes); indexes must be unique."""
    every = sorted([*channels, *([timestamp] if timestamp else [])], key=lambda c: c.index)
    if len({c.index for c in every}) != len(every):
        raise ScanFormatError("two enabled scan elements share one _index")
    if timestamp is not None and (timestamp.type.storage_bits != 64 or timestamp.type.bits != 64):
        raise ScanFormatError("the timestamp channel is not a 64-bit value")
    pos = largest = 0
    offsets: dict[str, int] = {}
    for ch in every:
        n = ch.type.length
        pos = (pos + n - 1) & ~(n - 1)
        offsets[ch.name] = pos
        pos += n
        largest = max(largest, n)
    scan_bytes = (pos + largest - 1) & ~(largest - 1) if largest else 0
    if not 0 < scan_bytes <= MAX_SCAN_BYTES:
        raise ScanFormatError(f"a scan of {scan_bytes} bytes")
    data = tuple(c for c in every if c is not timestamp)
    return Layout(
        data,
        tuple(offsets[c.name] for c in data),
        offsets[timestamp.name] if timestamp is not None else None,
        scan_bytes,
    )


@dataclass(frozen=True, slots=True)
class Scans:
    values: npt.NDArray[np.float64]  # (n, columns): (raw + offset) * scale, one column per value
    timestamps: npt.NDArray[np.int64] | None  # (n,) ns, when the scan carries a timestamp


def decode(data: bytes | bytearray | memoryview, lay: Layout) -> Scans:
    """Whole scans only: len(data) must be a multiple of scan_bytes (the caller keeps the remainder)."""
    if len(data) % lay.scan_bytes:
        raise ScanFormatError(f"{len(data)} bytes is not a whole number of {lay.scan_bytes}-byte scans")
    n = len(data) // lay.scan_bytes
    rows = np.frombuffer(data, dtype=np.uint8).reshape(n, lay.scan_bytes)
    columns: list[npt.NDArray[np.float64]] = []
    for ch, off in zip(lay.channels, lay.offsets, strict=True):
        t = ch.type
        dtype = np.dtype(f"{'>' if t.big_endian else '<'}u{t.storage_bytes}")
        word = rows[:, off : off + t.length].copy().view(dtype).astype(np.uint64)  # (n, repeat)
        mask = np.uint64((1 << t.bits) - 1)
        v = (word >> np.uint64(t.shift)) & mask
        if t.signed:
            raw = v.astype(np.int64)
            if t.bits < 64:
                raw = np.where(raw >= 1 << (t.bits - 1), raw - (1 << t.bits), raw)
            phys = (raw.astype(np.float64) + ch.offset) * ch.scale
        else:
            phys = (v.astype(np.float64) + ch.offset) * ch.scale
        columns.extend(phys[:, k] for k in range(t.repeat))
    values = np.stack(columns, axis=1) if columns else np.zeros((n, 0))
    stamps = None
    if lay.timestamp_offset is not None:
        o = lay.timestamp_offset
        stamps = rows[:, o : o + 8].copy().view("<i8").reshape(n).astype(np.int64)
    return Scans(values, stamps)


def to_g(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    """m/s^2 (an accel channel's unit after scale) -> float32 g."""
    return (values / STANDARD_GRAVITY).astype(np.float32)


def encode(raw: npt.NDArray[np.int64], lay: Layout, timestamps: npt.NDArray[np.int64] | None = None) -> bytes:
    """Raw integer values (n, channels) -> buffer bytes, as a driver would push them (tests, recordings)."""
    n = raw.shape[0]
    rows = np.zeros((n, lay.scan_bytes), dtype=np.uint8)
    for col, (ch, off) in enumerate(zip(lay.channels, lay.offsets, strict=True)):
        t = ch.type
        v = (raw[:, col].astype(np.int64) & ((1 << t.bits) - 1)).astype(np.uint64) << np.uint64(t.shift)
        dtype = np.dtype(f"{'>' if t.big_endian else '<'}u{t.storage_bytes}")
        rows[:, off : off + t.storage_bytes] = v.astype(dtype).reshape(n, 1).view(np.uint8)
    if lay.timestamp_offset is not None:
        if timestamps is None:
            raise ValueError("this layout has a timestamp channel: pass timestamps")
        o = lay.timestamp_offset
        rows[:, o : o + 8] = timestamps.astype("<i8").reshape(n, 1).view(np.uint8)
    return rows.tobytes()
