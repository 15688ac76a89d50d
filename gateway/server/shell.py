"""The MQTT shell: paho IO on one network thread. The decisions live elsewhere and this module carries
them out: the pure pipeline (gateway/core/pipeline.py) says what each message is, the batch processor
(gateway/server/batches.py) infers and stores a batch and says what to send, the pure result flow
(gateway/core/result_flow.py) says which stored result goes to paho now and what a PUBACK confirms.

Why one thread (docs/PERFORMANCE.md, "Gateway client structure"): paho's receive path is most of the
per-message cost, and any hand-off to another thread or to asyncio adds a queue operation, a wake-up
and GIL ping-pong per message. Here `on_message` runs the pure pipeline inline; a full batch is
inferred, committed and published in the same callback; a partial batch goes as soon as no further
packet is ready on the socket (or at max_wait_ms), checked between `client.loop()` calls. Nothing in
this thread waits on the asyncio shell; the shell only swaps the registry snapshot (one reference) and
sets stop flags.

Ack discipline: an input is PUBACKed to the broker only after its rejection was counted, or after its
result was stored durably (the per-batch transaction, store.py); the result's own PUBACK then deletes
the stored copy, and a restart republishes whatever is still stored. Waiting for the result's PUBACK
before acking inputs looked simpler but fails on a backlog: mosquitto 2.0.11 pushes past our
ReceiveMaximum once acks flow (8,192 and 15,132 unacked seen with receive_maximum 1024), and the
PUBACKs for our results queue behind that backlog in the same TCP stream, so every input waited for
the whole backlog.

Backpressure (no overload drops): this thread reads the socket only between batches it has finished,
so reads never outrun inference and TCP leaves the rest of a backlog in the broker. The pipeline queue
therefore holds only the open batches, with two exceptions handled here: a `queue_max` below the batch
size (the open batches are flushed when the queue is full, before the next read) and results the
broker has not confirmed. Those are never a reason to hold input acks or to stop reading (their
PUBACKs arrive on the read side, behind the backlog, so pausing reads until they come would
deadlock): when MAX_UNCONFIRMED result batches lack a PUBACK, a new result batch stays in the store
only (`gateway_pending`, on disk), its inputs are acked, and it is published from the store once
PUBACKs make room. Memory stays bounded (paho holds at most MAX_UNCONFIRMED result payloads) and the
pipeline's `overloaded` bound is a last resort that this shell does not reach.
Packet ids are per connection, so acks are tagged with the connection generation and dropped after a
reconnect: the broker redelivers those inputs and the replay window rejects them (their results are
already stored).
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.common.backoff import Backoff
from gateway.common.logs import RateLimitedLog
from gateway.common.mqtt import connect_properties, set_nodelay
from gateway.core.pipeline import Accepted, BatchReady, Pipeline, Rejected
from gateway.core.result_flow import MAX_UNCONFIRMED, ResultFlow
from gateway.core.topics import DEADLETTER_TOPIC, RESULTS_TOPIC, UP_FILTER
from gateway.pb import messages_pb2 as pb
from gateway.server.batches import BatchProcessor, ModelLike, SparkplugSink
from gateway.server.metrics import GatewayStats
from gateway.server.receipts import Receipts
from gateway.server.store import ResultStore
from gateway.store.base import StoreError

log = logging.getLogger("sgw.gateway")

_time_ns = time.time_ns
_QUEUE_RETRY_S = 0.05
TAKEOVER_CHECK_NS = 5 * 10**9  # how often to look for results a silent instance left (one cheap SELECT)


@dataclass(frozen=True)
class ShellOptions:
    gateway_id: str
    host: str
    port: int
    share_group: str
    session_expiry_s: int
    receive_maximum: int
    keepalive_s: int
    results_json: bool
    deadletter: bool
    drain_timeout_s: float = 10.0
    takeover_after_s: float = 60.0  # [gateway] takeover_after_s (ResultStore.take_over)


class MqttShell:
    def __init__(
        self,
        *,
        client: paho.Client,
        options: ShellOptions,
        pipeline: Pipeline,
        models: Mapping[str, ModelLike],
        store: ResultStore,
        stats: GatewayStats,
        receipts: Receipts | None = None,
        max_unconfirmed: int = MAX_UNCONFIRMED,
    ) -> None:
        self._client = client
        self._opt = options
        self._pipeline = pipeline
        self._feed = pipeline.feed
        # Inference, the batch transaction and the statistics (gateway/server/batches.py); this class
        # sends what it returns.
        self._batches = BatchProcessor(models=models, store=store, stats=stats, pipeline=pipeline,
                                       results_json=options.results_json)
        self._batches.receipts = receipts
        self._store = store
        self._stats = stats
        self.receipts = receipts
        self._rejections = RateLimitedLog(logging.getLogger("sgw.gateway.rejections"))
        # Result batches to the broker and the ack tags of each connection (gateway/core/result_flow.py).
        self._flow = ResultFlow(max_unconfirmed)
        self._republish_due = True  # pending rows from a previous run go out after the first CONNACK
        self._next_takeover_ns = 0
        self._connected = False
        self._draining = False
        self._received = 0
        # A model swap handed over by the asyncio shell (SIGHUP, gateway/server/service.py): one reference,
        # taken by the network thread between two batches, so a batch is inferred by one model whole.
        self._swap: dict[str, ModelLike] | None = None
        self._stop = threading.Event()
        self.heartbeat = time.monotonic()
        self.fatal: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sgw-mqtt", daemon=True)
        self._filter = f"$share/{options.share_group}/{UP_FILTER}"
        client.manual_ack_set(True)
        # Result publishes per batch: a few hundred a second at full load. Let many be in flight so a
        # slow PUBACK does not hold back the acks of the inputs behind it.
        client.max_inflight_messages_set(1000)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe

    # -- lifecycle (called from the asyncio shell) --------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Drain: stop taking new messages, finish and publish waiting batches, wait for PUBACKs."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def swap_models(self, models: Mapping[str, ModelLike]) -> None:
        """Run these (already loaded) models from the next batch on. Windows queued meanwhile stay in the
        pipeline and are inferred by the new one; nothing is dropped or inferred twice."""
        self._swap = dict(models)

    # -- the network thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:
            self.fatal = exc
            log.exception("network thread failed")
        finally:
            self._stats.connected = False

    def _connect(self, backoff: Backoff) -> bool:
        client, opt = self._client, self._opt
        props = connect_properties(session_expiry_s=opt.session_expiry_s, receive_maximum=opt.receive_maximum)
        while not self._stop.is_set():
            try:
                client.connect(opt.host, opt.port, keepalive=opt.keepalive_s, clean_start=False,
                               properties=props)
                return True
            except OSError as exc:
                delay = backoff.next_delay()
                fields = {"host": opt.host, "port": opt.port, "error": str(exc), "retry_s": round(delay, 2)}
                log.warning("broker unreachable", extra={"fields": fields})
                self._stop.wait(delay)
        return False

    def _serve(self) -> None:
        client = self._client
        pipeline = self._pipeline
        backoff = Backoff()
        if not self._connect(backoff):
            return
        next_housekeeping = 0.0
        while not self._stop.is_set():
            # With a batch waiting, only peek at the socket: when nothing more is ready the batch goes
            # now, so at low rates a window waits for no one, and under load batches fill by themselves
            # (messages pile up in the socket while a batch is inferred). max_wait_ms stays the cap.
            waiting = pipeline.next_deadline_ns() is not None
            timeout = 0.0 if waiting else 0.1
            if self.receipts is not None and self.receipts.book.pending:
                timeout = min(timeout, 0.02)  # receipts are batched for ~20 ms, then sent
            if self._flow.deferred:
                timeout = min(timeout, 0.0 if self._flow.can_send_deferred else _QUEUE_RETRY_S)
            received = self._received
            rc = client.loop(timeout)
            now = _time_ns()
            if waiting and self._received == received and self._input_idle():
                batches = pipeline.flush()
            else:
                batches = pipeline.poll(now)
            if self._swap is not None:
                self._apply_swap()
            for batch in batches:
                self._process(batch)
            if self.receipts is not None and self._connected:
                self._send_receipts(now)
            mono = time.monotonic()
            self.heartbeat = mono
            if self._flow.deferred:
                self._publish_deferred()
            if mono >= next_housekeeping:
                next_housekeeping = mono + 0.5
                self._housekeeping(now)
            if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
                self._lost(f"loop: {paho.error_string(rc)}")
                delay = backoff.next_delay()
                if self._stop.wait(delay):
                    break
                try:
                    client.reconnect()
                except OSError as exc:
                    log.warning("reconnect failed", extra={"fields": {"error": str(exc)}})
                    continue
            elif self._connected:
                backoff.reset()
        self._drain()

    def _apply_swap(self) -> None:
        swap, self._swap = self._swap, None
        if swap:
            self._batches.swap(swap)

    @property
    def sparkplug(self) -> SparkplugSink | None:
        """Optional Sparkplug B output (gateway/server/sparkplug.py): handed each stored batch and each
        device status; it only queues them, its own thread does the rest."""
        return self._batches.sparkplug

    @sparkplug.setter
    def sparkplug(self, sink: SparkplugSink | None) -> None:
        self._batches.sparkplug = sink

    def _input_idle(self) -> bool:
        """No byte of a further packet is ready (in OpenSSL's buffer or the socket)."""
        sock = self._client.socket()
        if sock is None:
            return True
        pending = getattr(sock, "pending", None)
        if pending is not None and pending() > 0:
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return not readable

    def _housekeeping(self, now: int) -> None:
        self._stats.active_devices = self._pipeline.active_devices(now)
        if self.receipts is not None:
            r, st = self.receipts, self._stats
            st.receipts_sent, st.receipts_unsealable = r.stats.sent, r.stats.unsealable
            st.receipted = {"accepted": r.stats.accepted, "rejected": r.stats.rejected}
            st.receipts_pending, st.receipts_dropped = r.book.pending, r.book.dropped
        if not self._flow.awaiting:
            self._store.purge()
        if self._connected and now >= self._next_takeover_ns:
            self._next_takeover_ns = now + TAKEOVER_CHECK_NS
            self._take_over(now)

    def _take_over(self, now: int) -> None:
        """Publish the results a silent instance stored and the broker never confirmed (docs/OPERATIONS.md,
        'Failover'): they join the deferred queue, so they go out as PUBACKs make room, oldest first."""
        try:
            moved = self._store.take_over(now, self._opt.takeover_after_s)
        except StoreError as exc:  # the next batch's commit reports a store that is really gone
            log.warning("could not look for results left by silent instances",
                        extra={"fields": {"error": str(exc)}})
            return
        if not moved:
            return
        self._flow.deferred.extend(i for i, _ in moved)
        self._stats.deferred_results = len(self._flow.deferred)
        self._stats.taken_over += len(moved)
        owners = sorted({owner for _, owner in moved})
        log.warning("took over results left unconfirmed by silent instances",
                    extra={"fields": {"batches": len(moved), "from": owners,
                                      "silent_for_s_at_least": self._opt.takeover_after_s}})

    def _drain(self) -> None:
        self._draining = True
        for batch in self._pipeline.flush():
            self._process(batch)
        if self.receipts is not None and self._connected:
            self._send_receipts(_time_ns() + 10**9)  # everything owed goes now (no batching wait)
        end = time.monotonic() + self._opt.drain_timeout_s
        flow = self._flow
        while (flow.awaiting or flow.deferred) and self._connected and time.monotonic() < end:
            if self._client.loop(0.05) not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
                break
            if flow.deferred:
                self._publish_deferred()
        self._store.purge()
        # Whatever is left stays in gateway_pending and is republished by the next start.
        fields = {"unconfirmed_batches": len(flow.awaiting), "unpublished_batches": len(flow.deferred)}
        log.info("drained", extra={"fields": fields})
        # A normal DISCONNECT keeps the session (expiry from CONNECT): unacked inputs are redelivered.
        self._client.disconnect()
        self._connected = False

    def _lost(self, why: str) -> None:
        if self._connected:
            log.warning("disconnected from broker", extra={"fields": {"why": why}})
        self._connected = False
        self._stats.connected = False

    # -- paho callbacks (network thread) ------------------------------------------------------

    def _on_connect(self, client: paho.Client, _u: Any, _flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the connection", extra={"fields": {"reason": str(reason)}})
            return
        set_nodelay(client)
        # Packet ids of the previous connection mean other messages now: never ack them.
        self._flow.connected()
        self._stats.inflight = 0
        self._connected = True
        self._stats.connected = True
        # QoS 2 asked so that a device's QoS 2 publish arrives as such and is refused as bad_qos (a QoS 1
        # subscription would silently downgrade it); sgw's broker config grants at most 1 anyway.
        rc, _mid = client.subscribe(self._filter, options=SubscribeOptions(qos=2))
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.error("subscribe failed", extra={"fields": {"rc": paho.error_string(rc)}})
        log.info("connected", extra={"fields": {"host": self._opt.host, "port": self._opt.port,
                                                "session_present": bool(_flags.session_present),
                                                "filter": self._filter}})
        if self._republish_due:
            self._republish_due = False
            self._republish_pending()

    def _on_subscribe(self, _c: paho.Client, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
        for code in codes:
            if code.is_failure:
                fields = {"filter": self._filter, "reason": str(code)}
                log.error("subscription refused", extra={"fields": fields})

    def _on_disconnect(self, _c: paho.Client, _u: Any, _flags: Any, reason: Any, _p: Any) -> None:
        if self._connected:
            self._stats.reconnects += 1
        self._lost(str(reason))

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        if self._draining or self._stop.is_set():
            return  # not acked: the broker redelivers it to this session (or another member)
        stats = self._stats
        stats.inflight += 1
        self._received += 1
        tag = self._flow.tag(msg.mid)
        qos = msg.qos
        now = _time_ns()
        receipts = self.receipts
        for ev in self._feed(msg.topic, bytes(msg.payload), now, tag, qos=qos, retained=msg.retain):
            # isinstance narrows the event for the checker: about 20 ns a message more than the
            # `type(ev) is` it replaced (timeit, this machine), against some 80 us of work per window.
            if isinstance(ev, Accepted):  # only ever QoS 1: the core refuses every other QoS
                if receipts is not None:
                    receipts.on_accepted(ev, now)
                if ev.reply is not None:
                    self._command_reply(ev)
                if not ev.queued:
                    self._ack(tag)
                    if self.sparkplug is not None and ev.status is not None:
                        self.sparkplug.status(ev.device_id, ev.status)
            elif isinstance(ev, Rejected):
                if receipts is not None:
                    receipts.on_rejected(ev, now)
                # Answer exactly what MQTT requires: QoS 0 gets nothing (a PUBACK with packet id 0 is a
                # protocol error that makes the broker drop this gateway), QoS 2 its PUBCOMP.
                if qos:
                    self._ack(tag, qos)
                else:
                    stats.inflight -= 1
                self._rejected(ev, msg.topic)
            else:
                self._process(ev)
        if self._pipeline.queued >= self._pipeline.queue_max:
            # Full with open batches (queue_max below the batch size): send them now, so the next message
            # read finds room. Never ack-and-drop for load; the broker keeps what this thread has not read.
            for batch in self._pipeline.flush():
                self._process(batch)

    def _on_publish(self, _c: paho.Client, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        pending_id = self._flow.on_publish(mid)
        if pending_id is None:
            return  # a QoS 0 JSON or dead-letter message
        if reason.is_failure:
            log.error("broker refused a result batch", extra={"fields": {"reason": str(reason)}})
        self._store.published(pending_id)

    # -- acks, rejections ---------------------------------------------------------------------

    def _ack(self, tag: int, qos: int = 1) -> None:
        mid = self._flow.ackable(tag)
        if mid is None:
            return
        self._stats.inflight -= 1
        rc = self._client.ack(mid, qos)
        if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.warning("ack failed", extra={"fields": {"rc": paho.error_string(rc)}})

    def _command_reply(self, ev: Accepted) -> None:
        """A device answered a command (`sgw device cmd` waits for it too; this is the record for
        replies that come after the CLI gave up, e.g. from a device that was offline)."""
        reply = ev.reply
        if reply is None:
            return
        log.info("command reply", extra={"fields": {"device": ev.device_id, "id": reply.command_id,
                                                    "ok": reply.ok, "error": reply.error}})

    def _rejected(self, ev: Rejected, topic: str) -> None:
        fields = {"reason": ev.reason.value, "device": ev.device_id or "?", "size": ev.size}
        self._rejections.emit(f"{ev.reason.value}:{ev.device_id}", "message rejected", fields)
        if self._opt.deadletter:
            dl = pb.DeadLetter(topic=topic[:256], claimed_device_id=ev.device_id or "",
                               reason=ev.reason.value, size=ev.size, received_ns=_time_ns(),
                               gateway_id=self._opt.gateway_id)
            # Metadata only and best effort (QoS 0): the rejection is already counted and logged.
            self._publish_qos0(DEADLETTER_TOPIC, dl.SerializeToString())

    # -- batches ----------------------------------------------------------------------------

    def _process(self, batch: BatchReady) -> None:
        done = self._batches.process(batch)
        ack = self._ack
        for tag in done.late:
            ack(tag)
        if done.late:
            self._rejections.emit("replay:late", "already processed by another instance",
                                  {"reason": "replay", "count": len(done.late)})
        if done.stored is None:
            return
        # Stored durably: the inputs are acked whether or not the result goes to paho now (the ack
        # discipline above).
        self._publish(*done.stored)
        for tag in done.kept:
            ack(tag)
        for topic, body in done.extras:
            self._publish_qos0(topic, body)

    def _publish(self, pending_id: int, payload: bytes) -> bool:
        """Hand a stored result batch to paho, or leave it in the store for `_publish_deferred`."""
        if not self._flow.stored(pending_id):
            self._stats.deferred_results = len(self._flow.deferred)
            return False
        return self._hand_to_paho(pending_id, payload)

    def _hand_to_paho(self, pending_id: int, payload: bytes) -> bool:
        info = self._client.publish(RESULTS_TOPIC, payload, qos=1)
        rc = info.rc
        # NO_CONN at QoS 1: paho keeps the message and sends it after the reconnect.
        if rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self._flow.handed(pending_id, info.mid)
            return True
        log.error("result publish failed", extra={"fields": {"rc": paho.error_string(rc)}})
        self._flow.refused(pending_id)
        return False

    def _publish_deferred(self) -> None:
        """Publish stored result batches, oldest first, while the flow has room for unconfirmed ones."""
        flow = self._flow
        flow.retry()
        while (pending_id := flow.next_deferred()) is not None:
            payload = self._store.payload(pending_id)
            if payload is not None and not self._hand_to_paho(pending_id, payload):
                break
        self._stats.deferred_results = len(flow.deferred)

    def _send_receipts(self, now: int) -> None:
        if self.receipts is not None:
            for topic, payload in self.receipts.flush(now):
                self._publish_qos0(topic, payload)

    def _publish_qos0(self, topic: str, payload: bytes | str) -> None:
        """Best-effort extras (JSON results, dead letters). paho numbers QoS 0 publishes from the same
        16-bit counter and reports them through on_publish too, so their mids are remembered: a QoS 0
        mid that wrapped onto a result still awaiting its PUBACK must not confirm that result."""
        info = self._client.publish(topic, payload, qos=0)
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._flow.qos0_sent(info.mid)
        elif info.rc != MQTTErrorCode.MQTT_ERR_NO_CONN:  # QoS 0 while disconnected is simply dropped
            self._rejections.emit("qos0", "best-effort publish failed",
                                  {"topic": topic.split("/", 3)[2], "rc": paho.error_string(info.rc)})

    def _republish_pending(self) -> None:
        rows = self._store.pending()
        for pending_id, payload in rows:
            self._publish(pending_id, payload)
        if rows:
            log.info("republished results pending from the previous run",
                     extra={"fields": {"batches": len(rows)}})

