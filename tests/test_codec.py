"""gateway.core.codec: int16-scaled windows round-trip within half a step; hostile windows fail closed."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import get_args

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gateway.agent.config import DeviceSection
from gateway.core.codec import MAX_SCALE, SENSOR_KINDS, SensorKindName, decode_samples, encode_window
from gateway.errors import RemoteError
from gateway.pb import messages_pb2 as pb
from gateway.server.config import RoutesSection
from gateway.sim.generator import Machine


def _window(x: np.ndarray, **kw: object) -> pb.TelemetryWindow:
    args: dict[str, object] = {
        "kind": "vibration", "sample_rate_hz": 1600.0, "start_ns": 123, "window_seq": 7,
        "score": 0.5, "prefilter_version": "ae-1", "reason": "anomaly",
    }
    args.update(kw)
    return encode_window(x, **args)  # type: ignore[arg-type]


def test_round_trip_of_generated_vibration() -> None:
    x, _ = Machine(seed=3, schedule=[(0.0, 1.0, "bearing")]).next_window(0.0)
    w = _window(x)
    assert w.encoding == pb.SAMPLE_ENCODING_INT16_SCALED
    assert list(w.shape) == [128, 3]
    assert len(w.samples) == 128 * 3 * 2
    assert w.kind == pb.SENSOR_KIND_VIBRATION and w.reason == pb.FORWARD_REASON_ANOMALY
    assert (w.start_ns, w.window_seq, w.prefilter_version) == (123, 7, "ae-1")
    back = decode_samples(pb.TelemetryWindow.FromString(w.SerializeToString()))
    assert back.dtype == np.float32 and back.shape == (128, 3)
    assert np.max(np.abs(back - x)) <= w.scale * 0.5 + 1e-7


def test_zero_window_decodes_to_zeros() -> None:
    w = _window(np.zeros((128, 3), np.float32))
    assert w.scale == 1.0
    assert not decode_samples(w).any()


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 64), st.integers(1, 4)),
                  elements=st.floats(-1e6, 1e6, width=32)))
def test_round_trip_error_is_at_most_half_a_step(x: np.ndarray) -> None:
    w = _window(x)
    back = decode_samples(w)
    assert back.shape == x.shape
    peak = float(np.max(np.abs(x)))
    assert np.all(np.abs(back.astype(np.float64) - x) <= w.scale * 0.5 + peak * 1e-6 + 1e-30)


def test_float32_encoding_is_accepted() -> None:
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    w = pb.TelemetryWindow(shape=[4, 3], encoding=pb.SAMPLE_ENCODING_FLOAT32, samples=x.tobytes())
    assert np.array_equal(decode_samples(w), x)


def test_encode_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="shaped"):
        _window(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        _window(np.array([[np.nan, 0.0]], np.float32))
    with pytest.raises(ValueError, match="reason"):
        _window(np.zeros((2, 3), np.float32), reason="bogus")


def _good() -> pb.TelemetryWindow:
    return _window(np.ones((128, 3), np.float32))


def _mutations() -> list[tuple[str, pb.TelemetryWindow]]:
    out: list[tuple[str, pb.TelemetryWindow]] = []

    def m(name: str, fn: object) -> None:
        w = _good()
        fn(w)  # type: ignore[operator]
        out.append((name, w))

    m("no shape", lambda w: w.ClearField("shape"))
    m("1-d shape", lambda w: (w.ClearField("shape"), w.shape.append(384)))
    m("3-d shape", lambda w: w.shape.append(1))
    m("zero rows", lambda w: w.shape.__setitem__(0, 0))
    m("short bytes", lambda w: setattr(w, "samples", w.samples[:-2]))
    m("odd bytes", lambda w: setattr(w, "samples", w.samples + b"\0"))
    m("shape lies", lambda w: w.shape.__setitem__(0, 129))
    m("huge shape", lambda w: (w.shape.__setitem__(0, 2**32 - 1), w.shape.__setitem__(1, 2**32 - 1)))
    m("too many values", lambda w: (w.shape.__setitem__(0, 65536), w.shape.__setitem__(1, 3)))
    m("no encoding", lambda w: setattr(w, "encoding", pb.SAMPLE_ENCODING_UNSPECIFIED))
    m("unknown encoding", lambda w: setattr(w, "encoding", 99))
    m("float32 with int16 bytes", lambda w: setattr(w, "encoding", pb.SAMPLE_ENCODING_FLOAT32))
    m("zero scale", lambda w: setattr(w, "scale", 0.0))
    m("negative scale", lambda w: setattr(w, "scale", -1.0))
    m("nan scale", lambda w: setattr(w, "scale", math.nan))
    m("inf scale", lambda w: setattr(w, "scale", math.inf))
    m("overflowing scale", lambda w: setattr(w, "scale", MAX_SCALE * 2))
    nan = _good()
    nan.encoding = pb.SAMPLE_ENCODING_FLOAT32
    nan.ClearField("shape")
    nan.shape.extend([1, 2])
    nan.samples = np.array([1.0, np.nan], np.float32).tobytes()
    out.append(("nan float32", nan))
    return out


@pytest.mark.parametrize(("name", "window"), _mutations(), ids=[n for n, _ in _mutations()])
def test_decode_rejects_mismatches(name: str, window: pb.TelemetryWindow) -> None:
    with pytest.raises(RemoteError) as err:
        decode_samples(window)
    assert err.value.reason == "decode_error"


def test_max_values_bounds_before_allocation() -> None:
    w = _good()
    with pytest.raises(RemoteError):
        decode_samples(w, max_values=128 * 3 - 1)
    assert decode_samples(w, max_values=128 * 3).shape == (128, 3)


def test_sensor_kinds_have_one_home() -> None:
    """codec.SensorKindName is the list: the wire enum, the gateway's routes section and the agent's
    [device] kind follow it, so a new kind is added there (and in messages.proto) only."""
    assert list(SENSOR_KINDS) == list(get_args(SensorKindName))
    assert {f.name for f in fields(RoutesSection)} == set(SENSOR_KINDS)
    assert DeviceSection.__annotations__["kind"] == "SensorKindName"
    named = {v for k, v in pb.SensorKind.items() if k != "SENSOR_KIND_UNSPECIFIED"}
    assert set(SENSOR_KINDS.values()) == named
