"""TelemetryWindow samples in and out: int16 with one scale per window on the way out, bounded parsing in.

Pure numpy. The gateway calls `decode_samples` on untrusted bytes in its hot path, so every size is
checked against the declared shape and `max_values` before anything is allocated, and the decode itself
is one `np.frombuffer` view plus one multiply.

INT16_SCALED: scale = max|x| / 32767 rounded to float32 (the wire type), raw = round(x / scale). The
error is at most scale / 2 per sample: about 15 micro-g for a 1 g peak, far under any sensor's noise.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

from gateway.core.reasons import Reason
from gateway.errors import RemoteError
from gateway.pb import messages_pb2 as pb

F32 = npt.NDArray[np.float32]

INT16_MAX = 32767
DEFAULT_MAX_VALUES = 65536
_I16 = np.dtype("<i2")
_F32 = np.dtype("<f4")
# A larger scale could turn -32768 * scale into infinity; no real sensor comes near it.
MAX_SCALE = float(np.finfo(np.float32).max) / 32768.0

# The sensor kinds, the one list: the agent's `[device] kind`, `sgw device add --kind`, the gateway's
# `[inference.routes]` keys and the wire enum (SENSOR_KIND_<NAME>, messages.proto) all follow it.
SensorKindName = Literal["vibration", "temperature", "current"]
SENSOR_KINDS: dict[str, pb.SensorKind.ValueType] = {
    name: pb.SensorKind.Value(f"SENSOR_KIND_{name.upper()}") for name in get_args(SensorKindName)
}
_REASONS: dict[str, pb.ForwardReason.ValueType] = {
    "anomaly": pb.FORWARD_REASON_ANOMALY,
    "summary": pb.FORWARD_REASON_SUMMARY,
}


def sensor_kind(name: str) -> pb.SensorKind.ValueType:
    """'vibration' -> SENSOR_KIND_VIBRATION; unknown names are UNSPECIFIED (the kind is informative)."""
    return SENSOR_KINDS.get(name, pb.SENSOR_KIND_UNSPECIFIED)


def forward_reason(name: str) -> pb.ForwardReason.ValueType:
    try:
        return _REASONS[name]
    except KeyError:
        raise ValueError(f"unknown forward reason {name!r}; expected one of {', '.join(_REASONS)}") from None


def encode_window(
    samples: npt.ArrayLike,
    *,
    kind: str | pb.SensorKind.ValueType,
    sample_rate_hz: float,
    start_ns: int,
    window_seq: int,
    score: float = 0.0,
    prefilter_version: str = "",
    reason: str | pb.ForwardReason.ValueType = pb.FORWARD_REASON_UNSPECIFIED,
    gap: bool = False,
    baseline_threshold: float = 0.0,
) -> pb.TelemetryWindow:
    """float (n, axes) -> TelemetryWindow with INT16_SCALED samples. Non-finite input is a caller bug."""
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"expected samples shaped (n, axes), got {x.shape}")
    peak = float(np.max(np.abs(x)))
    if not math.isfinite(peak):
        raise ValueError("samples contain NaN or infinity")
    # The scale is rounded to float32 first so the sender quantizes with exactly what the receiver reads.
    scale = np.float32(peak / INT16_MAX) if peak > 0.0 else np.float32(1.0)
    if scale == 0.0:  # a peak so small its scale underflows float32: every sample rounds to zero anyway
        scale = np.float32(1.0)
    raw = np.rint(x / scale)
    np.clip(raw, -INT16_MAX, INT16_MAX, out=raw)
    return pb.TelemetryWindow(
        kind=sensor_kind(kind) if isinstance(kind, str) else kind,
        sample_rate_hz=sample_rate_hz,
        start_ns=start_ns,
        shape=list(x.shape),
        encoding=pb.SAMPLE_ENCODING_INT16_SCALED,
        scale=float(scale),
        samples=raw.astype(_I16).tobytes(),
        prefilter_score=score,
        prefilter_version=prefilter_version,
        window_seq=window_seq,
        reason=forward_reason(reason) if isinstance(reason, str) else reason,
        gap=gap,
        baseline_threshold=baseline_threshold,
    )


def _bad(why: str) -> RemoteError:
    return RemoteError(Reason.DECODE_ERROR, f"decode_error: {why}")


def decode_samples(window: pb.TelemetryWindow, *, max_values: int = DEFAULT_MAX_VALUES) -> F32:
    """The window's samples as float32 (n, axes). Raises RemoteError("decode_error") on any mismatch."""
    shape = window.shape
    if len(shape) != 2:
        raise _bad(f"shape has {len(shape)} dimensions, expected 2")
    rows, cols = shape[0], shape[1]
    if rows < 1 or cols < 1 or rows > max_values or cols > max_values or rows * cols > max_values:
        raise _bad("shape out of bounds")
    count = rows * cols
    data = window.samples
    encoding = window.encoding
    if encoding == pb.SAMPLE_ENCODING_INT16_SCALED:
        if len(data) != 2 * count:
            raise _bad("sample bytes do not match the shape")
        scale = window.scale
        if not (0.0 < scale <= MAX_SCALE):  # also false for NaN
            raise _bad("scale must be finite and positive")
        out = np.frombuffer(data, dtype=_I16).astype(np.float32)
        out *= np.float32(scale)
        return out.reshape(rows, cols)
    if encoding == pb.SAMPLE_ENCODING_FLOAT32:
        if len(data) != 4 * count:
            raise _bad("sample bytes do not match the shape")
        out = np.frombuffer(data, dtype=_F32).astype(np.float32)
        if not np.isfinite(out).all():
            raise _bad("non-finite sample")
        return out.reshape(rows, cols)
    raise _bad("unsupported sample encoding")
