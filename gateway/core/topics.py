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
