"""The MQTT topic names of the device channels: the one home for these strings (the broker ACL in
gateway/pki/broker.py spells the same names as patterns)."""

from __future__ import annotations

TOPIC_PREFIX = "sgw/v1/dev/"
TOPIC_SUFFIX = "/up"  # device -> gateway, sealed telemetry
CMD_SUFFIX = "/cmd"  # gateway -> device, sealed downlink (receipts, commands)


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
