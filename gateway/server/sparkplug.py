"""The Sparkplug B edge node's IO: its own MQTT connection and thread, the persisted bdSeq, the hand-off.

Why a connection of its own (docs/OPERATIONS.md, "SCADA"): the edge node's NDEATH must be the Will of
the connection that carries its births, and the telemetry connection keeps a persistent session whose
Will would fire on unrelated reconnects; the broker also allows one connection per certificate CN, so the
edge node has its own identity, `sgw-sparkplug-<gateway.id>`.

The gateway's network thread only appends to a bounded deque (`results`, `status`): converting results,
building Sparkplug payloads and publishing happen in this module's thread, so SCADA output never slows
inference. When that deque is full (the SCADA broker link is down for long), the oldest entries go and
are counted in `dropped`; Sparkplug data is live state, not a ledger (the ResultBatch topic is).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.common.backoff import Backoff
from gateway.common.mqtt import TlsFiles, connect_properties, make_client, set_nodelay
from gateway.core import sparkplug as spb
from gateway.core.pipeline import Item
from gateway.inference.decision import confidence, decide, gate_of
from gateway.pb import messages_pb2 as pb
from gateway.registry.ids import sparkplug_cn

log = logging.getLogger("sgw.gateway.sparkplug")

MAX_BACKLOG = 4096  # result batches and status messages waiting for the Sparkplug thread
_LOOP_S = 0.1
_EXPIRE_EVERY_S = 0.5


class ModelInfo(Protocol):
    name: str
    version: str
    labels: tuple[str, ...]


class BdSeqFile:
    """The last bdSeq used, one decimal number in a small file beside the gateway's registry.

    Each new connection takes the next value (mod 256) and writes it before connecting, so a restart after
    SIGKILL, whose NDEATH the broker sent with the old value, births with a new one."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def next(self) -> int:
        try:
            last = int(self.path.read_text().strip())
        except (FileNotFoundError, ValueError):
            last = -1  # first start, or a damaged file: 0 is a valid fresh start for a host application
        value = (last + 1) & 0xFF
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(f"{value}\n")
        tmp.replace(self.path)
        return value


def results_of(
    model: ModelInfo, items: Sequence[Item], scores: npt.NDArray[np.float32], keep: Sequence[bool]
) -> list[spb.Result]:
    labels = model.labels
    best = decide(labels, scores, [gate_of(it.window) for it in items])
    conf = [confidence(labels, row, b) for row, b in zip(scores.tolist(), best, strict=True)]
    out = []
    for it, b, c, k in zip(items, best, conf, keep, strict=True):
        if not k:
            continue
        w = it.window
        out.append(
            spb.Result(
                device_id=it.device_id,
                label=labels[b] if b < len(labels) else str(b),
                confidence=float(c),
                anomaly_score=float(w.prefilter_score),
                model=model.name,
                model_version=model.version,
                window_seq=int(w.window_seq),
                timestamp_ms=int(w.start_ns) // 1_000_000,
            )
        )
    return out


def health_of(status: pb.DeviceStatus) -> spb.Health:
    seen = status.windows_seen
    fraction = status.windows_forwarded / seen if seen else 0.0
    return spb.Health(
        forwarded_fraction=min(1.0, fraction),
        outbox_messages=int(status.outbox_messages),
        commissioning=bool(status.commissioning),
    )


class SparkplugPublisher:
    """Runs one EdgeNode on its own paho client and thread."""

    def __init__(
        self,
        *,
        node: spb.EdgeNode,
        client: paho.Client,
        host: str,
        port: int,
        keepalive_s: int,
        bd_seq: BdSeqFile,
    ) -> None:
        self.node = node
        self._client = client
        self._host = host
        self._port = port
        self._keepalive = keepalive_s
        self._bd_file = bd_seq
        self._bd_seq = 0
        self._inbox: deque[tuple[str, Any]] = deque(maxlen=MAX_BACKLOG)
        self._stop = threading.Event()
        self._connected = False
        self._want_birth = False
        self._commands: deque[bytes] = deque(maxlen=16)
        self.dropped = 0
        self.births = 0
        self._thread = threading.Thread(target=self._run, name="sgw-sparkplug", daemon=True)
        self._ncmd = spb.node_topic(node.group_id, "NCMD", node.edge_node_id)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message

    # -- hand-off (any thread) --------------------------------------------------------------------

    def results(
        self, model: ModelInfo, items: Sequence[Item], scores: npt.NDArray[np.float32], keep: Sequence[bool]
    ) -> None:
        self._put(("results", (model, list(items), scores, list(keep))))

    def status(self, device_id: str, status: pb.DeviceStatus) -> None:
        self._put(("status", (device_id, status)))

    def revoked(self, device_ids: Iterable[str]) -> None:
        ids = list(device_ids)
        if ids:
            self._put(("revoked", ids))

    def _put(self, entry: tuple[str, Any]) -> None:
        if len(self._inbox) == MAX_BACKLOG:
            self.dropped += 1
        self._inbox.append(entry)

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    # -- the thread --------------------------------------------------------------------------------

    def _arm_will(self) -> None:
        self._bd_seq = self._bd_file.next()
        will = self.node.will(self._bd_seq, _now_ms())
        self._client.will_set(will.topic, will.payload, qos=will.qos, retain=False)

    def _run(self) -> None:
        try:
            self._serve()
        except Exception:
            log.exception("sparkplug thread failed")

    def _serve(self) -> None:
        client = self._client
        backoff = Backoff()
        connected_once = False
        next_expire = 0.0
        while not self._stop.is_set():
            if not self._connected:
                if connected_once and self._stop.wait(backoff.next_delay()):
                    break
                # A new connection: a new bdSeq in the Will before CONNECT, the NBIRTH after CONNACK.
                if not self._reconnect(first=not connected_once, backoff=backoff):
                    continue
                connected_once = True
            rc = client.loop(_LOOP_S)
            if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
                self._lost(paho.error_string(rc))
                continue
            if self._want_birth:
                self._want_birth = False
                self._send(self.node.connected(self._bd_seq, _now_ms()))
                self.births += 1
                backoff.reset()
            while self._commands:
                self._send(self.node.command(self._commands.popleft(), _now_ms()))
            self._drain_inbox()
            mono = time.monotonic()
            if mono >= next_expire:
                next_expire = mono + _EXPIRE_EVERY_S
                self._send(self.node.expire(time.time_ns(), _now_ms()))
        if self._connected:
            # A clean stop: send the NDEATH ourselves (a normal DISCONNECT discards the Will).
            will = self.node.will(self._bd_seq, _now_ms())
            info = client.publish(will.topic, will.payload, qos=1)
            end = time.monotonic() + 2.0
            while not info.is_published() and time.monotonic() < end and self._connected:
                client.loop(0.05)
            client.disconnect()
        self.node.disconnected()

    def _reconnect(self, *, first: bool, backoff: Backoff) -> bool:
        self._arm_will()
        props = connect_properties()  # clean start, no session: Sparkplug state is rebuilt by births
        try:
            if first:
                self._client.connect(
                    self._host, self._port, keepalive=self._keepalive, clean_start=True, properties=props
                )
            else:
                self._client.reconnect()
        except OSError as exc:
            delay = backoff.next_delay()
            fields = {"host": self._host, "port": self._port, "error": str(exc), "retry_s": round(delay, 2)}
            log.warning("sparkplug: broker unreachable", extra={"fields": fields})
            self._stop.wait(delay)
            return False
        self._connected = True  # the socket is open; on_connect decides whether the session is
        return True

    def _drain_inbox(self) -> None:
        inbox, node = self._inbox, self.node
        while inbox:
            kind, body = inbox.popleft()
            now_ns, now_ms = time.time_ns(), _now_ms()
            if kind == "results":
                self._send(node.results(results_of(*body), now_ns, now_ms))
            elif kind == "status":
                device_id, status = body
                self._send(node.status(device_id, health_of(status), now_ns, now_ms))
            else:
                self._send(node.revoked(body, now_ms))

    def _send(self, publishes: list[spb.Publish]) -> None:
        for p in publishes:
            info = self._client.publish(p.topic, p.payload, qos=p.qos)
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                log.warning("sparkplug publish failed", extra={"fields": {"rc": paho.error_string(info.rc)}})

    def _lost(self, why: str) -> None:
        if self._connected:
            log.warning("sparkplug: disconnected", extra={"fields": {"why": why}})
        self._connected = False
        self.node.disconnected()

    # -- paho callbacks (this thread) --------------------------------------------------------------

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("sparkplug: broker refused the connection", extra={"fields": {"reason": str(reason)}})
            self._connected = False
            return
        set_nodelay(client)
        client.subscribe(self._ncmd, options=SubscribeOptions(qos=1))
        self._want_birth = True
        log.info(
            "sparkplug: connected",
            extra={
                "fields": {
                    "host": self._host,
                    "port": self._port,
                    "bdSeq": self._bd_seq,
                    "topic": spb.node_topic(self.node.group_id, "NBIRTH", self.node.edge_node_id),
                }
            },
        )

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._lost(str(reason))

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic == self._ncmd:
            self._commands.append(bytes(msg.payload))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def make_publisher(
    *,
    gateway_id: str,
    group_id: str,
    edge_node_id: str,
    silence_s: float,
    host: str,
    port: int,
    keepalive_s: int,
    tls: TlsFiles,
    state_dir: Path,
) -> SparkplugPublisher:
    node = spb.EdgeNode(
        group_id=group_id, edge_node_id=edge_node_id, gateway_id=gateway_id, silence_ns=int(silence_s * 1e9)
    )
    client = make_client(sparkplug_cn(gateway_id), tls)
    bd = BdSeqFile(state_dir / f"sparkplug-{group_id}-{edge_node_id}.bdseq")
    return SparkplugPublisher(
        node=node, client=client, host=host, port=port, keepalive_s=keepalive_s, bd_seq=bd
    )
