"""The gateway's Sparkplug B edge node, sans-IO: results, device status and time in, MQTT publishes out.

One EdgeNode per gateway instance (edge node id = gateway.id by default). Sparkplug B 3.0 rules kept here:
- every message the node sends carries `seq`, 0 after NBIRTH and +1 (mod 256) per message, NDEATH none;
- each MQTT connection has a `bdSeq` (0-255): the Will registered at CONNECT is an NDEATH carrying it and
  the NBIRTH that follows carries the same value, so a host application can tell which birth a death ends;
  the caller picks it (persisted across restarts, gateway/server/sparkplug.py);
- a device is born (DBIRTH, every metric with its type) at its first result, then sends DDATA; it dies
  (DDEATH) when silent for `silence_ns` or revoked, and is born again by its next result;
- each NBIRTH (a new connection, or an NCMD `Node Control/Rebirth` = true) is followed by a DBIRTH per live
  device, carrying its last result.
The topic strings of the Sparkplug namespace live here (their ACL patterns in gateway/pki/broker.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from gateway.pb import spb_pb2 as spb

NAMESPACE = "spBv1.0"
REBIRTH = "Node Control/Rebirth"
BDSEQ = "bdSeq"
MAX_NCMD_BYTES = 4096  # a rebirth command is a few dozen bytes; anything larger is not read

# Device metrics: name -> Sparkplug datatype. The DBIRTH lists all of them; DDATA only those it has.
LABEL = "Inference/Label"
CONFIDENCE = "Inference/Confidence"
ANOMALY = "Inference/Anomaly Score"
MODEL = "Inference/Model"
MODEL_VERSION = "Inference/Model Version"
WINDOW_SEQ = "Inference/Window Seq"
FORWARDED = "Agent/Forwarded Fraction"
OUTBOX = "Agent/Outbox Messages"
COMMISSIONING = "Agent/Commissioning"
DEVICE_METRICS: dict[str, int] = {
    LABEL: spb.String,
    CONFIDENCE: spb.Float,
    ANOMALY: spb.Float,
    MODEL: spb.String,
    MODEL_VERSION: spb.String,
    WINDOW_SEQ: spb.UInt64,
    FORWARDED: spb.Float,
    OUTBOX: spb.UInt64,
    COMMISSIONING: spb.Boolean,
}
GATEWAY_ID = "Node Info/Gateway Id"

Value = str | float | int | bool


def node_topic(group_id: str, kind: str, edge_node_id: str) -> str:
    return f"{NAMESPACE}/{group_id}/{kind}/{edge_node_id}"


def device_topic(group_id: str, kind: str, edge_node_id: str, device_id: str) -> str:
    return f"{NAMESPACE}/{group_id}/{kind}/{edge_node_id}/{device_id}"


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 0


@dataclass(frozen=True, slots=True)
class Result:
    """One inference result of a device, as the edge node reports it."""

    device_id: str
    label: str
    confidence: float
    anomaly_score: float  # the agent's prefilter score (baseline distance once commissioned)
    model: str
    model_version: str
    window_seq: int
    timestamp_ms: int  # the window's start, sensor clock


@dataclass(frozen=True, slots=True)
class Health:
    """The agent-side figures from a DeviceStatus."""

    forwarded_fraction: float
    outbox_messages: int
    commissioning: bool


@dataclass(slots=True)
class _Device:
    last_ns: int
    born: bool = False  # DBIRTH sent since the last NBIRTH, no DDEATH since
    health: Health | None = None
    last: Result | None = None  # for the DBIRTH after a rebirth; None once dead


def _metric(payload: spb.Payload, name: str, value: Value | None, ts_ms: int) -> None:
    dtype = DEVICE_METRICS.get(name) or _NODE_TYPES[name]
    m = payload.metrics.add(name=name, timestamp=ts_ms, datatype=dtype)
    if value is None:
        m.is_null = True
    elif dtype == spb.String:
        m.string_value = str(value)
    elif dtype == spb.Float:
        m.float_value = float(value)
    elif dtype in (spb.UInt64, spb.Int64):
        m.long_value = int(value)
    elif dtype == spb.Boolean:
        m.boolean_value = bool(value)
    else:  # pragma: no cover - every type used above is handled
        raise TypeError(name)


_NODE_TYPES: dict[str, int] = {BDSEQ: spb.UInt64, REBIRTH: spb.Boolean, GATEWAY_ID: spb.String}


def _result_values(r: Result) -> Iterable[tuple[str, Value]]:
    return (
        (LABEL, r.label),
        (CONFIDENCE, r.confidence),
        (ANOMALY, r.anomaly_score),
        (MODEL, r.model),
        (MODEL_VERSION, r.model_version),
        (WINDOW_SEQ, r.window_seq),
    )


def _health_values(h: Health | None) -> Iterable[tuple[str, Value | None]]:
    if h is None:
        return ((FORWARDED, None), (OUTBOX, None), (COMMISSIONING, None))
    return ((FORWARDED, h.forwarded_fraction), (OUTBOX, h.outbox_messages), (COMMISSIONING, h.commissioning))


def ndeath(bd_seq: int, now_ms: int) -> bytes:
    """The Will payload: bdSeq only, no seq (the broker sends it when the connection is lost)."""
    p = spb.Payload(timestamp=now_ms)
    _metric(p, BDSEQ, bd_seq, now_ms)
    return p.SerializeToString()


def parse_rebirth(payload: bytes) -> bool:
    """True when an NCMD asks for a rebirth. Anything unreadable or oversized is no command."""
    if len(payload) > MAX_NCMD_BYTES:
        return False
    try:
        p = spb.Payload.FromString(payload)
    except DecodeError:
        return False
    return any(
        m.name == REBIRTH and m.WhichOneof("value") == "boolean_value" and m.boolean_value for m in p.metrics
    )


class EdgeNode:
    def __init__(self, *, group_id: str, edge_node_id: str, gateway_id: str, silence_ns: int) -> None:
        self.group_id = group_id
        self.edge_node_id = edge_node_id
        self._gateway_id = gateway_id
        self._silence_ns = silence_ns
        self._seq = 0
        self._bd_seq: int | None = None  # None: not connected, nothing may be sent
        self._devices: dict[str, _Device] = {}

    @property
    def online(self) -> bool:
        return self._bd_seq is not None

    def will(self, bd_seq: int, now_ms: int) -> Publish:
        return Publish(self._node_topic("NDEATH"), ndeath(bd_seq, now_ms), qos=1)

    def _node_topic(self, kind: str) -> str:
        return node_topic(self.group_id, kind, self.edge_node_id)

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFF
        return self._seq

    def _device_message(
        self, kind: str, device_id: str, values: Iterable[tuple[str, Value | None, int]], now_ms: int
    ) -> Publish:
        p = spb.Payload(timestamp=now_ms, seq=self._next_seq())
        for name, value, ts in values:
            _metric(p, name, value, ts)
        return Publish(device_topic(self.group_id, kind, self.edge_node_id, device_id), p.SerializeToString())

    def connected(self, bd_seq: int, now_ms: int) -> list[Publish]:
        """A new MQTT connection whose Will carries `bd_seq`: NBIRTH, then DBIRTH for the live devices."""
        self._bd_seq = bd_seq
        return self._birth(now_ms)

    def disconnected(self) -> None:
        self._bd_seq = None

    def _birth(self, now_ms: int) -> list[Publish]:
        self._seq = 0
        p = spb.Payload(timestamp=now_ms, seq=0)
        _metric(p, BDSEQ, self._bd_seq, now_ms)
        _metric(p, REBIRTH, False, now_ms)
        _metric(p, GATEWAY_ID, self._gateway_id, now_ms)
        out = [Publish(self._node_topic("NBIRTH"), p.SerializeToString())]
        for device_id, dev in self._devices.items():
            dev.born = dev.last is not None
            if dev.last is not None:
                out.append(self._dbirth(device_id, dev, dev.last, now_ms))
        return out

    def _dbirth(self, device_id: str, dev: _Device, result: Result, now_ms: int) -> Publish:
        values: list[tuple[str, Value | None, int]] = [
            (n, v, result.timestamp_ms) for n, v in _result_values(result)
        ]
        values += [(n, v, now_ms) for n, v in _health_values(dev.health)]
        return self._device_message("DBIRTH", device_id, values, now_ms)

    def command(self, payload: bytes, now_ms: int) -> list[Publish]:
        if not self.online or not parse_rebirth(payload):
            return []
        return self._birth(now_ms)

    def results(self, rows: Sequence[Result], now_ns: int, now_ms: int) -> list[Publish]:
        by_device: dict[str, list[Result]] = {}
        for r in rows:
            by_device.setdefault(r.device_id, []).append(r)
        out: list[Publish] = []
        for device_id, batch in by_device.items():
            dev = self._devices.get(device_id)
            if dev is None:
                dev = self._devices[device_id] = _Device(now_ns)
            dev.last_ns = now_ns
            dev.last = batch[-1]
            if not self.online:
                continue
            results = batch
            if not dev.born:
                dev.born = True
                out.append(self._dbirth(device_id, dev, results[0], now_ms))
                results = results[1:]
                if not results:
                    continue
            data = [(n, v, r.timestamp_ms) for r in results for n, v in _result_values(r)]
            out.append(self._device_message("DDATA", device_id, data, now_ms))
        return out

    def status(self, device_id: str, health: Health, now_ns: int, now_ms: int) -> list[Publish]:
        """A DeviceStatus: kept for the next DBIRTH; a born device reports it at once."""
        dev = self._devices.get(device_id)
        if dev is None:
            # Status alone does not birth a device (its DBIRTH needs a result's metrics).
            self._devices[device_id] = _Device(now_ns, health=health)
            return []
        dev.health = health
        dev.last_ns = now_ns
        if not (self.online and dev.born):
            return []
        values = [(n, v, now_ms) for n, v in _health_values(health)]
        return [self._device_message("DDATA", device_id, values, now_ms)]

    def expire(self, now_ns: int, now_ms: int) -> list[Publish]:
        """DDEATH for each born device silent longer than silence_ns; forget devices silent twice as long."""
        out: list[Publish] = []
        for device_id, dev in list(self._devices.items()):
            idle = now_ns - dev.last_ns
            if dev.born and idle > self._silence_ns:
                out += self._death(device_id, dev, now_ms)
            if not dev.born and idle > 2 * self._silence_ns:
                del self._devices[device_id]
        return out

    def revoked(self, device_ids: Iterable[str], now_ms: int) -> list[Publish]:
        out: list[Publish] = []
        for device_id in device_ids:
            dev = self._devices.pop(device_id, None)
            if dev is not None and dev.born:
                out += self._death(device_id, dev, now_ms)
        return out

    def _death(self, device_id: str, dev: _Device, now_ms: int) -> list[Publish]:
        dev.born = False
        dev.last = None
        if not self.online:
            return []
        return [self._device_message("DDEATH", device_id, (), now_ms)]
