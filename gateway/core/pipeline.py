"""The gateway's sans-IO pipeline: (topic, payload, now) in, events out. No sockets, clocks or threads.

Per message, in order (cheapest refusal first, so a flood costs as little as possible):
  topic shape -> per-device rate limit (topic id: the broker's ACL binds it to the device certificate)
  -> Opener.open (size, envelope, registry status, key, AEAD, replay) -> topic id == envelope id
  -> Plaintext decode -> clock skew (only the future: outboxes replay old windows after outages)
  -> route by sensor kind -> sample decode and shape check -> bounded queue -> micro-batch.

The shell feeds every message and acts on the events: `Rejected` is acked at once (the rejection is
recorded in the counters here), `Accepted(queued=False)` (device status) is acked at once, and
`BatchReady` goes to inference; its items are acked only after their results are published. Counters
are plain ints read by the metrics collector, so the hot path makes no metrics calls.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError

from gateway.core.batcher import MicroBatcher
from gateway.core.codec import DEFAULT_MAX_VALUES, SENSOR_KINDS, decode_samples
from gateway.core.downlink import DownlinkRefusedError, parse_reply
from gateway.core.reasons import Reason
from gateway.core.session import Opened
from gateway.core.session import Rejected as OpenRejected
from gateway.core.topics import device_of
from gateway.errors import RemoteError
from gateway.pb import downlink_pb2 as dpb
from gateway.pb import messages_pb2 as pb

F32 = npt.NDArray[np.float32]

_parse_plaintext = pb.Plaintext.FromString


class OpenerLike(Protocol):
    def open(
        self, raw: bytes, now_ns: int, expected_device_id: str | None = None
    ) -> Opened | OpenRejected: ...


class Limiter(Protocol):
    def allow(self, device_id: str, now_ns: int) -> bool: ...


@dataclass(slots=True)
class Item:
    """One accepted telemetry window on its way to a model. `tag` is the shell's, an integer the core only
    hands back (the MQTT shell packs the connection generation and the packet id into it)."""

    device_id: str
    epoch: int
    counter: int
    key_id: int  # the device key that sealed it: the stored replay window keeps the highest seen
    window: pb.TelemetryWindow
    samples: F32
    end_ns: int  # sensor time of the last sample: the start of the end-to-end latency
    received_ns: int
    tag: int


# What a receipt may tell the device about one of its messages (docs/PROTOCOL.md, "Receipts"):
# (epoch, counter, device key id to seal the receipt to).
ReceiptKey = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class Accepted:
    device_id: str
    kind: str  # sensor kind, or "status" for a DeviceStatus
    queued: bool  # False: nothing more will happen to it (ack now)
    tag: int
    receipt: ReceiptKey | None = None  # a status: done once accepted, receipt it now
    status: pb.DeviceStatus | None = None  # the body of a "status" message (for the Sparkplug output)
    reply: dpb.CommandReply | None = None  # the body of a "reply" (a device's answer to a command)


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: Reason
    device_id: str | None  # as claimed by the topic: unauthenticated
    size: int
    tag: int
    # Set when the device should hear about it: `seen` True = processed before (a resend: receipt it as
    # accepted once nothing of that device is in flight), False = never processable (receipt a rejection).
    receipt: ReceiptKey | None = None
    seen: bool = False


@dataclass(frozen=True, slots=True)
class BatchReady:
    route: str  # model name
    items: list[Item]


Event = Accepted | Rejected | BatchReady


@dataclass(frozen=True, slots=True)
class Committed:
    """A batch after its transaction: `kept` got a stored result, `late` were already processed by
    another instance (counted as replays, no result). Both are acked."""

    kept: list[Item]
    late: list[Item]


@dataclass(frozen=True, slots=True)
class Route:
    model: str
    window_shape: tuple[int, int]


class Pipeline:
    def __init__(
        self,
        *,
        opener: OpenerLike,
        limiter: Limiter,
        routes: Mapping[str, Route],
        max_batch: int = 64,
        max_wait_ns: int = 5_000_000,
        queue_max: int = 8192,
        max_clock_skew_ns: int = 30_000_000_000,
        max_values: int = DEFAULT_MAX_VALUES,
        decode: Callable[..., F32] = decode_samples,
    ) -> None:
        self._opener = opener
        self._limiter = limiter
        self._queue_max = queue_max
        self._skew_ns = max_clock_skew_ns
        self._max_values = max_values
        self._decode = decode
        # Keyed by the wire enum so the hot path does one dict lookup per window.
        self._routes: dict[int, tuple[str, Route]] = {}
        for kind, route in routes.items():
            self._routes[SENSOR_KINDS[kind]] = (kind, route)
        # Deadlines are polled by the shell after each socket read, not checked per message (`put`).
        models = {r.model for _, r in self._routes.values()}
        self._batcher: MicroBatcher[str, Item] = MicroBatcher(
            max(1, max_batch), max(0, max_wait_ns), max_keys=max(1, len(models)))
        self._put = self._batcher.put
        self.queued = 0  # items between acceptance and release(): batches waiting + in inference/publish
        self.accepted = 0
        self.rejections: dict[Reason, int] = dict.fromkeys(Reason, 0)
        self.windows: dict[str, int] = {}
        self.replies: dict[str, int] = {}  # command replies by outcome: ok | error | expired
        self.last_seen: dict[str, int] = {}

    # -- the hot path ---------------------------------------------------------------------------

    def _reject(self, reason: Reason, device_id: str | None, size: int, tag: int,
                receipt: ReceiptKey | None = None, *, seen: bool = False) -> list[Event]:
        self.rejections[reason] += 1
        return [Rejected(reason, device_id, size, tag, receipt, seen)]

    def feed(self, topic: str, payload: bytes, now_ns: int, tag: int = 0, *, qos: int = 1,
             retained: bool = False) -> list[Event]:
        size = len(payload)
        # Telemetry is QoS 1, never retained (docs/PROTOCOL.md). Anything else is refused before any
        # device state is touched; the shell answers it exactly as MQTT requires for that QoS.
        topic_id = device_of(topic)
        if qos != 1:
            return self._reject(Reason.BAD_QOS, topic_id or None, size, tag)
        if retained:
            return self._reject(Reason.RETAINED, topic_id or None, size, tag)
        if topic_id is None:
            return self._reject(Reason.TOPIC_MISMATCH, None, size, tag)
        if not self._limiter.allow(topic_id, now_ns):
            return self._reject(Reason.RATE_LIMITED, topic_id, size, tag)
        # The topic is the broker-authenticated identity: the open refuses a header naming anyone else
        # before it touches that device's state (docs/PROTOCOL.md, opening step 5).
        opened = self._opener.open(payload, now_ns, topic_id)
        if not isinstance(opened, Opened):
            return self._reject(opened.reason, topic_id, size, tag, opened.claim, seen=opened.seen)
        device_id = opened.device_id
        # Authenticated from here: a refusal below is final (the counter is used up), so the device
        # learns it from its receipt instead of resending.
        final = (opened.epoch, opened.counter, opened.header.device_key_id)
        try:
            plain = _parse_plaintext(opened.plaintext)
        except DecodeError:
            return self._reject(Reason.DECODE_ERROR, device_id, size, tag, final)
        if plain.sealed_at_ns > now_ns + self._skew_ns:
            return self._reject(Reason.CLOCK_SKEW, device_id, size, tag, final)
        body = plain.WhichOneof("body")
        if body == "status":
            self.accepted += 1
            self.last_seen[device_id] = now_ns
            return [Accepted(device_id, "status", False, tag, final, plain.status)]
        if body == "command_reply":
            try:
                reply = parse_reply(plain.command_reply)
            except DownlinkRefusedError:
                return self._reject(Reason.MALFORMED, device_id, size, tag, final)
            self.accepted += 1
            self.last_seen[device_id] = now_ns
            outcome = "ok" if reply.ok else ("expired" if reply.error.startswith("expired") else "error")
            self.replies[outcome] = self.replies.get(outcome, 0) + 1
            return [Accepted(device_id, "reply", False, tag, final, reply=reply)]
        if body != "window":
            return self._reject(Reason.MALFORMED, device_id, size, tag, final)
        window = plain.window
        found = self._routes.get(window.kind)
        if found is None:
            return self._reject(Reason.UNROUTABLE, device_id, size, tag, final)
        kind, route = found
        try:
            samples = self._decode(window, max_values=self._max_values)
        except RemoteError:
            return self._reject(Reason.DECODE_ERROR, device_id, size, tag, final)
        if samples.shape != route.window_shape or not window.sample_rate_hz > 0.0:
            return self._reject(Reason.MALFORMED, device_id, size, tag, final)
        if self.queued >= self._queue_max:
            return self._reject(Reason.OVERLOADED, device_id, size, tag, final)
        self.queued += 1
        self.accepted += 1
        self.last_seen[device_id] = now_ns
        windows = self.windows
        windows[kind] = windows.get(kind, 0) + 1
        end_ns = window.start_ns + int((samples.shape[0] - 1) * 1e9 / window.sample_rate_hz)
        item = Item(device_id, opened.epoch, opened.counter, opened.header.device_key_id, window, samples,
                    end_ns, now_ns, tag)
        full = self._put(route.model, item, now_ns)
        accepted = Accepted(device_id, kind, True, tag)
        if full is not None:
            return [accepted, BatchReady(route.model, list(full.items))]
        return [accepted]

    # -- deadlines and accounting -----------------------------------------------------------------

    def poll(self, now_ns: int) -> list[BatchReady]:
        """Batches whose oldest item has waited max_wait: latency stays bounded at low rates."""
        return [BatchReady(b.key, list(b.items)) for b in self._batcher.poll(now_ns)]

    def flush(self) -> list[BatchReady]:
        """Every waiting batch now (drain on shutdown)."""
        return [BatchReady(b.key, list(b.items)) for b in self._batcher.drain()]

    def next_deadline_ns(self) -> int | None:
        return self._batcher.next_deadline_ns()

    @property
    def queue_max(self) -> int:
        return self._queue_max

    def release(self, count: int) -> None:
        """`count` queued items left the gateway (result published and acked, or dropped)."""
        self.queued = max(0, self.queued - count)

    def committed(self, items: list[Item], keep: list[bool]) -> Committed:
        """The store's answer for a batch (keep[i]: items[i]'s result was stored): every item leaves the
        queue, and one that another instance had already committed is a `replay` here. The shell acks
        all of them (their outcome is durable either way) and publishes results only for `kept`."""
        kept = [it for it, k in zip(items, keep, strict=True) if k]
        late = [it for it, k in zip(items, keep, strict=True) if not k]
        if late:
            self.rejections[Reason.REPLAY] += len(late)
        self.release(len(items))
        return Committed(kept, late)

    def active_devices(self, now_ns: int, horizon_ns: int = 60_000_000_000) -> int:
        """Devices heard from within the horizon; forgets older ones so the map stays bounded."""
        cutoff = now_ns - horizon_ns
        seen = self.last_seen
        stale = [d for d, t in seen.items() if t < cutoff]
        for d in stale:
            del seen[d]
        return len(seen)
