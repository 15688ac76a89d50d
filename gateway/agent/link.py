"""One MQTT connection of the agent: a paho client driven from the asyncio event loop.

A Link lives for exactly one connection. When it drops, the service throws it away and builds a new one
after a backoff, then replays the outbox from its oldest message: state never leaks between
connections, and nothing is re-sent by paho behind the outbox's back.

paho runs on the event loop through its external-loop interface, as aiomqtt drives it: `loop_read` when
the socket is readable, `loop_write` while paho has bytes to send (its register/unregister-write
callbacks), `loop_misc` once a second (keepalive). So every paho callback runs on the loop's thread and
posts its event directly; the one other thread is the TCP connect and TLS handshake, which paho only
does blocking (run in a worker, bounded by a deadline, before any callback is attached).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho

from gateway.agent.config import AgentConfig
from gateway.common.mqtt import MqttError, TlsFiles, connect_properties, make_client, set_nodelay
from gateway.core.topics import cmd_topic_for

log = logging.getLogger("sgw.agent.link")

PAHO_MAX_INFLIGHT = 65535  # 16-bit packet ids: paho refuses more unacknowledged QoS 1 messages
DEFAULT_RECEIVE_MAXIMUM = 65535
SOCKET_TIMEOUT_S = 5.0
SESSION_EXPIRY_S = 86400  # commands for a device offline longer than a day are dropped by the broker
NO_MATCHING_SUBSCRIBERS = 0x10  # MQTT 5: a CONNACK without Receive Maximum means 65,535


@dataclass(frozen=True, slots=True)
class Connected:
    receive_maximum: int


@dataclass(frozen=True, slots=True)
class Puback:
    mid: int
    ok: bool
    reason: str
    unheard: bool = False  # 0x10 "No matching subscribers": accepted by the broker, delivered to no one


@dataclass(frozen=True, slots=True)
class Down:
    reason: str


@dataclass(frozen=True, slots=True)
class Downlink:
    """A message on the device's cmd topic: sealed by a gateway (or forged); the service opens it."""

    topic: str
    payload: bytes


Event = Connected | Puback | Down | Downlink
MAX_DOWNLINK_BYTES = 16384  # the downlink's own bound (core/downlink.py); larger is refused unread


# Why the broker refused or closed us on purpose, from the error or disconnect text (paho and OpenSSL put
# the reason only in text). Checked in order; a miss means an ordinary network failure.
_REFUSALS = (
    ("revoked", "certificate_revoked"),
    ("administrative action", "disconnected_by_broker"),  # the broker's kick after `sgw device revoke`
    ("not authorized", "not_authorized"),
    ("bad user name or password", "not_authorized"),
    ("session taken over", "session_taken_over"),
    ("certificate", "certificate_refused"),
    ("qos not supported", "protocol_refused"),
)
REFUSAL_REASONS = tuple(dict.fromkeys(reason for _text, reason in _REFUSALS))


def refusal_reason(error: str) -> str | None:
    """The refusal reason a connect error or disconnect reason names, or None (network trouble)."""
    low = error.lower()
    return next((reason for text, reason in _REFUSALS if text in low), None)


class ConnectFailedError(Exception):
    """The broker could not be reached or refused us; the message says why (never a key)."""


class Link:
    def __init__(self, cfg: AgentConfig, loop: asyncio.AbstractEventLoop, wake: asyncio.Event) -> None:
        self._cfg = cfg
        self._topic = cfg.topic
        self._loop = loop
        self._wake = wake
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        files = TlsFiles(cfg.mqtt.ca_file, cfg.mqtt.cert_file, cfg.mqtt.key_file)
        self._client = make_client(cfg.device.id, files)
        # We never let paho reconnect on its own (the service does, with backoff and a fresh Link).
        self._client.reconnect_delay_set(min_delay=60, max_delay=60)
        self._client.on_connect = self._on_connect
        self._client.on_publish = self._on_publish
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._cmd_topic = cmd_topic_for(cfg.device.id)
        # paho reports why the socket failed (e.g. OpenSSL's "alert certificate revoked": the broker's
        # answer to a revoked certificate) only in its log; keep the last such line for the Down event.
        self._client.on_log = self._on_log
        self._socket_error = ""
        self._attached: int | None = None  # the socket's fd while the loop watches it
        self._misc: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()  # set once the loop stopped watching the socket
        self._dial: asyncio.Future[Any] | None = None
        self.up = False

    # paho callbacks (on the event loop's thread) --------------------------------------------------------
    def _post(self, event: Event) -> None:
        self.events.put_nowait(event)
        self._wake.set()

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            self._post(Down(f"connack: {rc}"))
            return
        set_nodelay(client)
        # Receipts and commands from the gateway (sealed end to end; the ACL lets only us read it).
        client.subscribe(self._cmd_topic, qos=1)
        recv_max = getattr(props, "ReceiveMaximum", None) or DEFAULT_RECEIVE_MAXIMUM
        self._post(Connected(int(recv_max)))

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        if len(msg.payload) <= MAX_DOWNLINK_BYTES:
            self._post(Downlink(msg.topic, bytes(msg.payload)))
        else:
            self._post(Downlink(msg.topic, b""))  # refused as malformed by the opener, and counted

    def _on_publish(self, _c: paho.Client, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        self._post(Puback(mid, not rc.is_failure, str(rc), rc.value == NO_MATCHING_SUBSCRIBERS))

    def _on_log(self, _c: paho.Client, _u: Any, level: int, buf: str) -> None:
        if level == paho.MQTT_LOG_ERR:
            self._socket_error = buf[:300]

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self._post(Down(f"{rc} ({self._socket_error})" if self._socket_error else str(rc)))

    # driving paho from the loop ------------------------------------------------------------------------
    def _attach(self) -> None:
        """Watch the connected socket; from here on paho does no IO but what the loop asks of it."""
        sock = self._client.socket()
        if sock is None:
            raise ConnectFailedError("the connection closed during the handshake")
        client = self._client
        client.on_socket_register_write = lambda _c, _u, s: self._loop.add_writer(s, self._writable)
        client.on_socket_unregister_write = self._unregister_write
        client.on_socket_close = lambda _c, _u, _s: self._detach()
        self._attached = sock.fileno()
        self._loop.add_reader(self._attached, self._readable)
        if client.want_write():  # bytes queued before the callbacks existed
            self._loop.add_writer(self._attached, self._writable)
        self._misc = self._loop.create_task(self._keepalive(), name="sgw-mqtt-misc")

    def _unregister_write(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        self._loop.remove_writer(sock)

    def _detach(self) -> None:
        if self._attached is not None:
            self._loop.remove_reader(self._attached)
            self._loop.remove_writer(self._attached)
            self._attached = None
        self._closed.set()
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None

    def _readable(self) -> None:
        rc = self._client.loop_read()
        sock = self._client.socket()
        # TLS: OpenSSL may hold decrypted bytes the socket no longer shows as readable; read them now.
        pending = getattr(sock, "pending", None)
        if rc == paho.MQTT_ERR_SUCCESS and pending is not None and pending() > 0:
            self._loop.call_soon(self._readable)

    def _writable(self) -> None:
        self._client.loop_write()

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self._client.loop_misc() != paho.MQTT_ERR_SUCCESS:  # keepalive lost: on_disconnect posted it
                return

    # event loop ------------------------------------------------------------------------------------------
    async def connect(self, will: bytes | None, timeout_s: float) -> Connected:
        """TCP and TLS (each bounded by paho's connect_timeout), then CONNACK within timeout_s."""
        c = self._cfg
        if will is not None:
            self._client.will_set(c.topic, will, qos=1, retain=False)
        self._client.max_inflight_messages_set(PAHO_MAX_INFLIGHT)
        self._client.connect_timeout = SOCKET_TIMEOUT_S
        self._dial = dial = asyncio.ensure_future(asyncio.to_thread(
            # A persistent session: the broker keeps the cmd subscription and queues commands (QoS 1)
            # while the device is away; each command's own expiry bounds how long it matters.
            self._client.connect, c.mqtt.host, c.mqtt.port, c.mqtt.keepalive_s,
            clean_start=False, properties=connect_properties(session_expiry_s=SESSION_EXPIRY_S),
        ))
        try:
            # paho bounds the TCP connect and the TLS handshake by connect_timeout each; this deadline
            # is above both, so the dialling thread has always finished when it passes.
            async with asyncio.timeout(3 * SOCKET_TIMEOUT_S):
                await asyncio.shield(dial)
        except TimeoutError:
            raise ConnectFailedError(f"{c.mqtt.host}:{c.mqtt.port}: connect did not finish") from None
        except (OSError, ValueError, MqttError) as exc:  # ssl.SSLError is an OSError
            raise ConnectFailedError(f"{c.mqtt.host}:{c.mqtt.port}: {exc}") from None
        try:
            self._attach()
            async with asyncio.timeout(timeout_s):
                event = await self.events.get()
        except TimeoutError:
            raise ConnectFailedError(
                f"no CONNACK from {c.mqtt.host}:{c.mqtt.port} within {timeout_s:g} s"
            ) from None
        except (OSError, ValueError, MqttError) as exc:  # ssl.SSLError is an OSError
            raise ConnectFailedError(f"{c.mqtt.host}:{c.mqtt.port}: {exc}") from None
        if isinstance(event, Down):
            raise ConnectFailedError(f"{c.mqtt.host}:{c.mqtt.port}: {event.reason}")
        if not isinstance(event, Connected):
            raise ConnectFailedError(f"unexpected event before CONNACK: {event}")
        self.up = True
        return event

    def publish(self, payload: bytes) -> int | None:
        """Queues one QoS 1 publish; its mid, or None if the connection is gone (a Down event follows)."""
        info = self._client.publish(self._topic, payload, qos=1)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            self.up = False
            return None
        return int(info.mid)

    async def close(self, timeout_s: float = 5.0) -> None:
        """DISCONNECT (so the broker discards the will) and stop the network thread, within a deadline."""
        self.up = False
        if self._dial is not None and not self._dial.done():
            # Still dialling (timed out or cancelled): a late connection must not linger with our id.
            self._dial.add_done_callback(lambda _f: self._client.disconnect())
        with contextlib.suppress(OSError, ValueError):
            self._client.disconnect()
        # The DISCONNECT is queued: let the loop write it (paho then closes the socket, which detaches),
        # within the deadline; a peer that stopped reading is cut off.
        try:
            if self._attached is not None:
                async with asyncio.timeout(timeout_s):
                    await self._closed.wait()
        except TimeoutError:
            log.warning("mqtt DISCONNECT not written in time", extra={"fields": {"timeout_s": timeout_s}})
        self._detach()
        sock = self._client.socket()
        if sock is not None:  # the peer never took the DISCONNECT: cut the connection here
            with contextlib.suppress(OSError):
                sock.close()
