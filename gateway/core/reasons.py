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
    # Crypto agility (issue 17): a suite outside the gateway's allow-list, or weaker than the registry's
    # minimum for that device (a downgrade attempt, or a device configured below its registration).
    SUITE_NOT_ALLOWED = "suite_not_allowed"
    DOWNGRADE = "downgrade"
    # Gateway key rotation (issue 17): sealed to a gateway key id whose grace period has ended.
    GATEWAY_KEY_RETIRED = "gateway_key_retired"


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
    RETIRED_KEY = "retired_key"  # sealed by a gateway key whose rotation grace period has ended


class ReleaseReason(StrEnum):
    """Why an agent or gateway refused a model release (gateway/core/release.py checks them in this
    order, so one release always gets the same reason)."""

    MALFORMED = "malformed"  # not a release file, or its statement does not parse
    UNSIGNED = "unsigned"  # no signature at all
    UNKNOWN_KEY = "unknown_key"  # signed, but by no key this device or gateway trusts
    BAD_SIGNATURE = "bad_signature"  # a trusted key's signature does not verify over the statement
    TAMPERED = "tampered"  # a file's bytes do not match the sha256 the signed statement gives
    WRONG_TARGET = "wrong_target"  # for the other role, another sensor kind or another model
    DOWNGRADE = "downgrade"  # a version below the installed one, without a signed allow_downgrade


class RollbackReason(StrEnum):
    """Why an agent went back by itself to the release that ran before a switch it had not yet confirmed
    (gateway/agent/probation.py; the label of sgw_agent_model_rollbacks_total)."""

    LOAD = "load"  # the new release no longer verifies or LiteRT cannot load it at start
    MISFIT = "misfit"  # it does not fit this sensor (window, rate, axes)
    SELFTEST = "selftest"  # it forwards too many of the healthy windows kept from before the switch
    CRASH_LOOP = "crash_loop"  # the agent started this often on it without reaching the confirmation
