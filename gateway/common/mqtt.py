"""paho-mqtt clients as sgw uses them: MQTT 5, mutual TLS (TLS 1.2 minimum), TCP_NODELAY, checked codes.

paho never sets TCP_NODELAY; without it QoS 0/1 latency over TLS was ~22 ms p50 here instead of ~0.1 ms
(shared/notes/mqtt-perf.md), so `set_nodelay` runs in every on_connect.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.errors import ConfigError, SgwError


class MqttError(SgwError):
    """A paho call returned an error code we cannot ignore (queue full, not connected, ...)."""

    def __init__(self, what: str, rc: int) -> None:
        super().__init__(f"{what}: {paho.error_string(rc)} (rc={rc})")
        self.rc = rc


@dataclass(frozen=True, slots=True)
class TlsFiles:
    ca_file: Path
    cert_file: Path
    key_file: Path


def tls_context(files: TlsFiles) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files.ca_file))
        ctx.load_cert_chain(certfile=str(files.cert_file), keyfile=str(files.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"mqtt: cannot load TLS files ({files.cert_file}, {files.key_file}): {exc}"
        ) from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def make_client(client_id: str, files: TlsFiles, *, userdata: Any = None) -> paho.Client:
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5,
        userdata=userdata,
    )
    client.tls_set_context(tls_context(files))
    return client


def connect_properties(*, session_expiry_s: int = 0, receive_maximum: int = 0) -> Properties:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    if session_expiry_s:
        props.SessionExpiryInterval = session_expiry_s
    if receive_maximum:
        # Bounds how many unacknowledged QoS 1 messages the broker sends us: our backpressure.
        props.ReceiveMaximum = receive_maximum
    return props


def set_nodelay(client: paho.Client) -> None:
    sock = client.socket()
    if isinstance(sock, socket.socket):  # an ssl.SSLSocket is one too
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def check(rc: int | MQTTErrorCode, what: str) -> None:
    """paho reports failures as return codes (MQTT_ERR_QUEUE_SIZE at 65,535 in flight); never ignore one."""
    code = int(rc)
    if code != paho.MQTT_ERR_SUCCESS:
        raise MqttError(what, code)
