"""A faster MQTT 5 PUBLISH decoder for paho's receive path, installed by the gateway process only.

py-spy on a draining gateway: paho's `decode_publish` was 27% of the network thread, and 19 points of
that were building and parsing an MQTT 5 `Properties` object for each message, although device
telemetry carries no properties. This decoder handles exactly that case (property length 0) and
hands every other packet (properties present, MQTT 3, anything odd) to paho's own decoder, so the
result is the same `PublishPacket` paho builds. Messages decoded here share one empty, read-only-by-
convention `Properties`; the gateway never reads message properties.

It replaces `paho.mqtt._packet.decode_publish`, a private function: `install()` checks the paho major
version and the function's shape first and does nothing if they differ (tests/test_gateway_units.py
compares both decoders on real packets).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import paho.mqtt
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger("sgw.gateway")

_original: Any = _packet.decode_publish
_EMPTY = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
_V5 = MQTTProtocolVersion.MQTTv5
_PublishPacket: Any = getattr(_packet, "PublishPacket", None)


def decode_publish(header: int, packet: bytes | bytearray, protocol: MQTTProtocolVersion) -> Any:
    if protocol != _V5 or len(packet) < 3:
        return _original(header, packet, protocol)
    slen = (packet[0] << 8) | packet[1]
    i = 2 + slen
    qos = (header & 0x06) >> 1
    mid = 0
    if qos:
        if len(packet) < i + 2:
            return _original(header, packet, protocol)
        mid = (packet[i] << 8) | packet[i + 1]
        i += 2
    if len(packet) <= i or packet[i] != 0 or slen == 0:
        return _original(header, packet, protocol)  # properties present (or a topic alias): paho's way
    return _PublishPacket(
        dup=bool(header & 0x08), qos=qos, retain=bool(header & 0x01), topic=bytes(packet[2:2 + slen]),
        mid=mid, properties=_EMPTY, payload=bytes(packet[i + 1:]),
    )


def install() -> bool:
    """Use the fast decoder if this paho looks like the one it was written against (2.x)."""
    if _packet.decode_publish is decode_publish:
        return True
    version = getattr(paho.mqtt, "__version__", "")
    try:
        params = list(inspect.signature(_original).parameters)
    except (TypeError, ValueError):
        params = []
    if not version.startswith("2.") or params != ["header", "packet", "protocol"] or _PublishPacket is None:
        log.info("paho fast path not installed", extra={"fields": {"paho": version}})
        return False
    _packet.decode_publish = decode_publish
    return True
