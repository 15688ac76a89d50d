"""What the demo watches: the results topic (as the observer identity) and the services' /metrics.

The observer is an independent witness: it counts results as a dashboard would see them, with the
observer certificate that the broker's ACL lets read results and nothing else, so "lost" and
"duplicates" in the summary do not trust the gateway's own counters.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from google.protobuf.message import DecodeError
from prometheus_client.parser import text_string_to_metric_families

from gateway.common.mqtt import TlsFiles, check, make_client, set_nodelay
from gateway.core.topics import RESULTS_TOPIC
from gateway.pb import messages_pb2

# Labels that mean "nothing wrong": everything else a model says is a fault (or an anomaly) to show.
HEALTHY_LABELS = frozenset({"healthy", "normal", "ok", "nominal"})

Labels = tuple[tuple[str, str], ...]


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no data."""
    data = sorted(values)
    if not data:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(data)))
    return data[min(rank, len(data)) - 1]


@dataclass
class ResultStats:
    results: int = 0
    batches: int = 0
    duplicates: int = 0
    undecodable: int = 0
    by_label: Counter[tuple[str, str]] = field(default_factory=Counter)  # (model, label) -> n
    by_device: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    windows: set[tuple[str, int]] = field(default_factory=set)  # (device, window_seq) that got a result
    predicted: dict[tuple[str, int], dict[str, str]] = field(default_factory=dict)  # window -> model -> label


class ResultObserver:
    """Subscribes to sgw/v1/results with the observer certificate and keeps counts (paho's thread)."""

    def __init__(self, home: Path, *, host: str, port: int, window_ns: int) -> None:
        files = TlsFiles(home / "ca" / "ca.crt", home / "observer" / "client.crt",
                         home / "observer" / "client.key")
        self._client = make_client("sgw-observer-demo", files)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._host, self._port = host, port
        self._window_ns = window_ns
        self._lock = threading.Lock()
        self._stats = ResultStats()
        self._seen: set[tuple[str, int, int, str]] = set()
        self._recent: deque[tuple[float, float]] = deque(maxlen=20_000)  # (monotonic, latency ms)
        self._subscribed = threading.Event()

    def start(self) -> None:
        self._client.connect(self._host, self._port, keepalive=30)
        check(self._client.loop_start(), "observer loop_start")

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._client.disconnect()
        with contextlib.suppress(Exception):
            self._client.loop_stop()

    def _on_connect(self, client: paho.Client, _ud: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if getattr(reason, "is_failure", False):
            return
        set_nodelay(client)
        client.subscribe(RESULTS_TOPIC, qos=1)
        self._subscribed.set()

    def _on_message(self, _client: paho.Client, _ud: Any, msg: paho.MQTTMessage) -> None:
        now_ns = time.time_ns()
        mono = time.monotonic()
        try:
            batch = messages_pb2.ResultBatch.FromString(bytes(msg.payload))
        except DecodeError:
            with self._lock:
                self._stats.undecodable += 1
            return
        with self._lock:
            st = self._stats
            st.batches += 1
            for r in batch.results:
                key = (r.device_id, r.epoch, r.counter, r.model_id)
                if key in self._seen:
                    st.duplicates += 1
                    continue
                self._seen.add(key)
                st.results += 1
                st.by_label[(r.model_id, r.label)] += 1
                st.by_device[r.device_id] += 1
                st.windows.add((r.device_id, r.window_seq))
                st.predicted.setdefault((r.device_id, r.window_seq), {})[r.model_id] = r.label
                if r.window_start_ns:
                    # The window exists once its last sample is taken: latency runs from there.
                    lat = (now_ns - (r.window_start_ns + self._window_ns)) / 1e6
                    st.latencies_ms.append(lat)
                    self._recent.append((mono, lat))

    def snapshot(self) -> ResultStats:
        with self._lock:
            st = self._stats
            return ResultStats(
                results=st.results, batches=st.batches, duplicates=st.duplicates, undecodable=st.undecodable,
                by_label=Counter(st.by_label), by_device=Counter(st.by_device),
                latencies_ms=list(st.latencies_ms), windows=set(st.windows),
                predicted={k: dict(v) for k, v in st.predicted.items()},
            )

    def recent_latencies(self, seconds: float) -> list[float]:
        cutoff = time.monotonic() - seconds
        with self._lock:
            return [lat for t, lat in self._recent if t >= cutoff]

    def has_result(self, device_id: str, window_seq: int) -> bool:
        with self._lock:
            return (device_id, window_seq) in self._stats.windows


class Metrics:
    """One parsed Prometheus exposition: sample name -> [(labels, value)]."""

    def __init__(self, text: str | None) -> None:
        self.ok = text is not None
        self.samples: dict[str, list[tuple[Labels, float]]] = {}
        if text is None:
            return
        try:
            for fam in text_string_to_metric_families(text):
                for s in fam.samples:
                    labels = tuple(sorted(s.labels.items()))
                    self.samples.setdefault(s.name, []).append((labels, float(s.value)))
        except ValueError:
            self.ok = False

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        want = set(labels.items())
        return sum(v for lab, v in self.samples.get(name, []) if want <= set(lab))

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for lab, v in self.samples.get(name, []):
            key = dict(lab).get(label)
            if key is not None:
                out[key] = out.get(key, 0.0) + v
        return out

    def rows(self, name: str) -> list[tuple[dict[str, str], float]]:
        return [(dict(lab), v) for lab, v in self.samples.get(name, [])]


class RateMeter:
    """Per-second rates of counters from successive readings, over a sliding span."""

    def __init__(self, span_s: float = 3.0) -> None:
        self._span = span_s
        self._hist: dict[str, deque[tuple[float, float]]] = {}

    def add(self, name: str, value: float, now: float | None = None) -> None:
        t = time.monotonic() if now is None else now
        h = self._hist.setdefault(name, deque())
        h.append((t, value))
        while len(h) > 2 and t - h[1][0] >= self._span:
            h.popleft()

    def rate(self, name: str) -> float:
        h = self._hist.get(name)
        if not h or len(h) < 2:
            return 0.0
        (t0, v0), (t1, v1) = h[0], h[-1]
        if t1 <= t0:
            return 0.0
        return max(0.0, (v1 - v0) / (t1 - t0))
