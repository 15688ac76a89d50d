"""IIO scan element types and buffer layout, against the kernel's rules (industrialio-buffer.c)."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.agent import iio_layout as L


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("le:s16/16>>0", L.ScanType(False, True, 16, 16, 0)),
        ("be:s12/16>>4", L.ScanType(True, True, 12, 16, 4)),
        ("le:u32/32>>0", L.ScanType(False, False, 32, 32, 0)),
        ("be:s20/32>>4\n", L.ScanType(True, True, 20, 32, 4)),  # ADXL355, as sysfs prints it
        ("le:s64/64>>0", L.ScanType(False, True, 64, 64, 0)),
        ("le:s12/16X4>>4", L.ScanType(False, True, 12, 16, 4, repeat=4)),
    ],
)
def test_parse_type(text: str, want: L.ScanType) -> None:
    assert L.parse_type(text) == want


@pytest.mark.parametrize(
    "text",
    [
        "le:f32/32>>0",  # float channels
        "le:s24/24>>0",  # 24-bit storage
        "le:s17/16>>0",  # more bits than storage
        "be:s12/16>>5",  # shift pushes the value out of its word
        "le:s16/16X3>>0",  # repeat that the kernel's alignment cannot express
        "xx:s16/16>>0",
        "",
    ],
)
def test_unsupported_types_are_refused(text: str) -> None:
    with pytest.raises(L.ScanFormatError, match="unsupported scan type"):
        L.parse_type(text)


def _ch(name: str, index: int, text: str, scale: float = 1.0, offset: float = 0.0) -> L.Channel:
    return L.Channel(name, index, L.parse_type(text), scale, offset)


def test_layout_aligns_each_element_to_its_size_and_pads_the_scan() -> None:
    ts = _ch("timestamp", 3, "le:s64/64>>0")
    # Three 16-bit channels then the timestamp: 0, 2, 4, pad to 8; the scan is 16 bytes.
    lay = L.layout(
        [
            _ch("accel_x", 0, "le:s16/16>>0"),
            _ch("accel_y", 1, "le:s16/16>>0"),
            _ch("accel_z", 2, "le:s16/16>>0"),
        ],
        ts,
    )
    assert (lay.offsets, lay.timestamp_offset, lay.scan_bytes) == ((0, 2, 4), 8, 16)
    # ADXL355: three be:s20/32 then the timestamp -> 0, 4, 8, ts at 16, 24 bytes.
    lay = L.layout([_ch(f"accel_{a}", i, "be:s20/32>>4") for i, a in enumerate("xyz")], ts)
    assert (lay.offsets, lay.timestamp_offset, lay.scan_bytes) == ((0, 4, 8), 16, 24)
    # Without a timestamp the scan pads only to its largest element: 3 x 2 = 6 bytes.
    lay = L.layout([_ch(f"accel_{a}", i, "le:s16/16>>0") for i, a in enumerate("xyz")])
    assert lay.scan_bytes == 6 and lay.timestamp_offset is None
    # Order is by _index, not by the order asked: u8 at index 0, then s32 aligned to 4.
    lay = L.layout([_ch("accel_y", 5, "le:s32/32>>0"), _ch("accel_x", 1, "le:u8/8>>0")])
    assert [c.name for c in lay.channels] == ["accel_x", "accel_y"] and lay.offsets == (0, 4)
    assert lay.scan_bytes == 8


def test_layout_refuses_duplicate_indexes() -> None:
    with pytest.raises(L.ScanFormatError, match="_index"):
        L.layout([_ch("accel_x", 0, "le:s16/16>>0"), _ch("accel_y", 0, "le:s16/16>>0")])


def test_decode_shift_sign_and_ignored_low_bits() -> None:
    lay = L.layout([_ch("accel_x", 0, "be:s12/16>>4", scale=0.5, offset=1.0)])
    assert lay.scan_bytes == 2
    # 0xFFF0 | 0x000F: -1 in the top 12 bits, the low 4 bits are status/garbage and must be ignored.
    data = bytes([0xFF, 0xFF, 0x7F, 0xF3, 0x80, 0x00])
    scans = L.decode(data, lay)
    assert scans.values[:, 0].tolist() == [(-1 + 1.0) * 0.5, (2047 + 1.0) * 0.5, (-2048 + 1.0) * 0.5]
    assert scans.timestamps is None


def test_decode_little_endian_unsigned_and_timestamp() -> None:
    lay = L.layout(
        [_ch("accel_x", 0, "le:u32/32>>0"), _ch("accel_y", 1, "le:s16/16>>0")],
        _ch("timestamp", 2, "le:s64/64>>0"),
    )
    raw = np.array([[4_294_967_295, -32768], [0, 32767]], dtype=np.int64)
    stamps = np.array([1_700_000_000_000_000_000, 1_700_000_000_000_625_000], dtype=np.int64)
    data = L.encode(raw, lay, stamps)
    assert len(data) == 2 * lay.scan_bytes == 32
    scans = L.decode(data, lay)
    assert scans.values.tolist() == [[4_294_967_295.0, -32768.0], [0.0, 32767.0]]
    assert scans.timestamps is not None and scans.timestamps.tolist() == stamps.tolist()


def test_decode_refuses_a_partial_scan() -> None:
    lay = L.layout([_ch("accel_x", 0, "le:s16/16>>0")])
    with pytest.raises(L.ScanFormatError, match="whole number"):
        L.decode(b"\x00\x00\x00", lay)


def test_to_g_uses_standard_gravity() -> None:
    g = L.to_g(np.array([[9.80665, -19.6133, 0.0]]))
    assert g.dtype == np.float32 and g.tolist() == [[1.0, -2.0, 0.0]]
