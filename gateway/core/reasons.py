"""The closed set of rejection reasons. Metric labels and dead letters use exactly these strings."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_DEVICE = "unknown_device"
    REVOKED = "revoked"
    BAD_AUTH = "bad_auth"
    REPLAY = "replay"
    STALE_SESSION = "stale_session"
    CLOCK_SKEW = "clock_skew"
    TOPIC_MISMATCH = "topic_mismatch"
    RATE_LIMITED = "rate_limited"
    DECODE_ERROR = "decode_error"
    UNROUTABLE = "unroutable"
    OVERLOADED = "overloaded"
    # Delivery states a device can steer (issue 14): telemetry is QoS 1 and never retained.
    BAD_QOS = "bad_qos"
    RETAINED = "retained"
