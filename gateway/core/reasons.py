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


class DownlinkReason(StrEnum):
    """Why an agent refused a downlink message (gateway -> device). A separate set because the receiver,
    its metrics and its failure modes differ from the gateway's; docs/PROTOCOL.md ("Downlink") orders them."""

    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    UNSUPPORTED_VERSION = "unsupported_version"
    WRONG_DEVICE = "wrong_device"
    UNKNOWN_SENDER = "unknown_sender"
    UNKNOWN_KEY = "unknown_key"
    TOO_MANY_SENDERS = "too_many_senders"
    STALE_EPOCH = "stale_epoch"
    REPLAY = "replay"
    TOO_OLD = "too_old"
    FORGED = "forged"
    EXPIRED = "expired"
