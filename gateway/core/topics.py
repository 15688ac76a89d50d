"""The MQTT topic names: the one home for these strings (the broker ACL in gateway/pki/broker.py spells
the same names as patterns)."""

from __future__ import annotations

TOPIC_PREFIX = "sgw/v1/dev/"
TOPIC_SUFFIX = "/up"  # device -> gateway, sealed telemetry
CMD_SUFFIX = "/cmd"  # gateway -> device, sealed downlink (receipts, commands)


UP_FILTER = TOPIC_PREFIX + "+" + TOPIC_SUFFIX  # what the gateways subscribe to (in their share group)
RESULTS_TOPIC = "sgw/v1/results"  # gateway -> consumers: one ResultBatch per inference batch, QoS 1
RESULTS_JSON_PREFIX = "sgw/v1/results/json/"  # + device id: one JSON document per result, QoS 0, optional
DEADLETTER_TOPIC = "sgw/v1/deadletter"  # rejected messages' metadata (never their bytes), QoS 0, optional


def topic_for(device_id: str) -> str:
    return f"{TOPIC_PREFIX}{device_id}{TOPIC_SUFFIX}"


def cmd_topic_for(device_id: str) -> str:
    return f"{TOPIC_PREFIX}{device_id}{CMD_SUFFIX}"


_PREFIX_LEN = len(TOPIC_PREFIX)
_SUFFIX_LEN = len(TOPIC_SUFFIX)


def device_of(topic: str) -> str | None:
    """The device id an uplink (telemetry) topic names ("" for `sgw/v1/dev//up`), or None when the topic
    is not an uplink topic at all."""
    if topic.startswith(TOPIC_PREFIX) and topic.endswith(TOPIC_SUFFIX):
        return topic[_PREFIX_LEN:-_SUFFIX_LEN]
    return None


# Zero-touch enrollment (docs/PROTOCOL.md, "Enrollment"). The level after the prefix is the broker's
# username for an IDevID on the enrollment listener: its certificate subject as RFC 2253 text
# (gateway/pki/enrollment.py `broker_username`), which always holds '=' and so can never be an sgw id.
ENROLL_PREFIX = "sgw/v1/enroll/"
ENROLL_REQ_SUFFIX = "/req"  # device -> enrollment service
ENROLL_RESP_SUFFIX = "/resp"  # enrollment service -> device


def enroll_req_topic(username: str) -> str:
    return f"{ENROLL_PREFIX}{username}{ENROLL_REQ_SUFFIX}"


def enroll_resp_topic(username: str) -> str:
    return f"{ENROLL_PREFIX}{username}{ENROLL_RESP_SUFFIX}"


def enroll_username_of(topic: str) -> str | None:
    """The username an enrollment request topic names, or None when it is not one."""
    if topic.startswith(ENROLL_PREFIX) and topic.endswith(ENROLL_REQ_SUFFIX):
        return topic[len(ENROLL_PREFIX):-len(ENROLL_REQ_SUFFIX)]
    return None
