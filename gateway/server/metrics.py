"""The gateway's Prometheus metrics (names: docs/ARCHITECTURE.md), collected at scrape time.

The hot path runs in paho's network thread and only bumps plain ints (in the pipeline and here);
this collector reads them when /metrics is scraped. Per-message prometheus-client calls (a lock and a
few attribute lookups each) would cost more than the whole pipeline step for a rejected message.
Histograms here are fed once per batch from arrays of values.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from gateway import __version__
from gateway.core.reasons import Reason, ReleaseReason

LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
INFERENCE_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Hist:
    """Bucket counts, written by one thread, read at scrape (list copies are atomic under the GIL)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last slot is +Inf only
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def observe_many(self, values: Iterable[float]) -> None:
        bounds, counts = self.bounds, self.counts
        total = 0.0
        for v in values:
            counts[bisect.bisect_left(bounds, v)] += 1
            total += v
        self.total += total

    def buckets(self) -> tuple[list[tuple[str, float]], float]:
        counts = list(self.counts)
        total = self.total
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, counts, strict=False):
            running += n
            out.append((_le(bound), float(running)))
        out.append(("+Inf", float(running + counts[-1])))
        return out, total


def _le(bound: float) -> str:
    return repr(float(bound))


@dataclass
class GatewayStats:
    """Everything the shell counts besides the pipeline's own counters."""

    reconnects: int = 0
    connected: bool = False
    inflight: int = 0
    # End-to-end receipts (gateway/server/receipts.py), copied in by the shell's housekeeping.
    receipts_sent: int = 0
    receipted: dict[str, int] = field(default_factory=lambda: {"accepted": 0, "rejected": 0})
    receipts_pending: int = 0  # devices owed a receipt
    receipts_dropped: int = 0  # outcomes past a bound (those devices resend)
    receipts_unsealable: int = 0  # owed to a device that is unknown, revoked or lost that key
    active_devices: int = 0
    results: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, label) -> count
    e2e: Hist = field(default_factory=lambda: Hist(LATENCY_BUCKETS_S))
    processing: Hist = field(default_factory=lambda: Hist(LATENCY_BUCKETS_S))
    batch_size: dict[str, Hist] = field(default_factory=dict)  # model ->
    inference: dict[tuple[str, str], Hist] = field(default_factory=dict)  # (model, backend) ->
    backends: list[tuple[str, str, str]] = field(default_factory=list)  # (model, backend, requested)
    registry_devices: dict[str, int] = field(default_factory=dict)  # status -> count
    deferred_results: int = 0  # result batches stored but not yet handed to paho (broker confirms slowly)
    taken_over: int = 0  # result batches another (silent) instance stored, published by this one
    model_refused: dict[str, int] = field(default_factory=dict)  # ReleaseReason value -> count
    model_versions: list[tuple[str, str]] = field(default_factory=list)  # (model, version) that run
    model_swaps: dict[str, int] = field(default_factory=dict)  # model -> hot swaps (SIGHUP) since start

    def batch_hist(self, model: str) -> Hist:
        h = self.batch_size.get(model)
        if h is None:
            h = self.batch_size[model] = Hist(BATCH_BUCKETS)
        return h

    def inference_hist(self, model: str, backend: str) -> Hist:
        h = self.inference.get((model, backend))
        if h is None:
            h = self.inference[(model, backend)] = Hist(INFERENCE_BUCKETS_S)
        return h


class PipelineCounters:
    """What the collector reads from the pipeline (duck-typed so tests can pass a stub)."""

    accepted: int
    replies: Mapping[str, int]
    rejections: Mapping[Reason, int]
    windows: Mapping[str, int]
    queued: int


class GatewayCollector(Collector):
    def __init__(self, stats: GatewayStats, pipeline: Callable[[], PipelineCounters | None]) -> None:
        self._stats = stats
        self._pipeline = pipeline

    def collect(self) -> Iterator[Metric]:
        s = self._stats
        p = self._pipeline()
        rejections = dict(p.rejections) if p is not None else dict.fromkeys(Reason, 0)

        messages = CounterMetricFamily(
            "sgw_gateway_messages", "Telemetry messages received, by outcome.", labels=["outcome"]
        )
        messages.add_metric(["accepted"], float(p.accepted if p is not None else 0))
        messages.add_metric(["rejected"], float(sum(rejections.values())))
        yield messages

        rej = CounterMetricFamily(
            "sgw_gateway_rejections", "Rejected messages by reason (closed set).", labels=["reason"]
        )
        for reason in Reason:
            rej.add_metric([reason.value], float(rejections.get(reason, 0)))
        yield rej

        win = CounterMetricFamily(
            "sgw_gateway_windows", "Accepted telemetry windows by sensor kind.", labels=["kind"]
        )
        for kind, n in sorted(dict(p.windows if p is not None else {}).items()):
            win.add_metric([kind], float(n))
        yield win

        replies = CounterMetricFamily(
            "sgw_gateway_command_replies", "Devices' replies to commands, by outcome.", labels=["outcome"]
        )
        got = dict(getattr(p, "replies", {}) or {}) if p is not None else {}
        for outcome in ("ok", "error", "expired"):
            replies.add_metric([outcome], float(got.get(outcome, 0)))
        yield replies

        res = CounterMetricFamily(
            "sgw_gateway_results", "Inference results published, by model and predicted label.",
            labels=["model", "label"],
        )
        for (model, label), n in sorted(dict(s.results).items()):
            res.add_metric([model, label], float(n))
        yield res

        yield _hist("sgw_gateway_e2e_latency_seconds",
                    "Window's last sample (sensor clock) to result published (gateway clock).", [],
                    {(): s.e2e})
        yield _hist("sgw_gateway_processing_latency_seconds",
                    "Message received by the gateway to its result published.", [], {(): s.processing})
        yield _hist("sgw_gateway_batch_size", "Windows per inference batch.", ["model"],
                    {(m,): h for m, h in dict(s.batch_size).items()})
        yield _hist("sgw_gateway_inference_latency_seconds", "Model invoke time per batch.",
                    ["model", "backend"], _by_labels(s.inference))

        yield _gauge("sgw_gateway_queue_depth", "Accepted windows not yet published and acknowledged.",
                     float(p.queued if p is not None else 0))
        yield _gauge("sgw_gateway_inflight_messages",
                     "Messages received and not yet acknowledged to the broker.", float(s.inflight))
        yield _gauge("sgw_gateway_results_unpublished_batches",
                     "Result batches stored and waiting for PUBACKs to make room before publishing.",
                     float(s.deferred_results))
        taken = CounterMetricFamily("sgw_gateway_results_taken_over",
                                    "Result batches a silent instance left unconfirmed, sent by this one.")
        taken.add_metric([], float(s.taken_over))
        yield taken
        yield _gauge("sgw_gateway_active_devices", "Devices heard from in the last 60 s.",
                     float(s.active_devices))
        yield _gauge("sgw_gateway_connected", "1 while connected to the broker.", 1.0 if s.connected else 0.0)
        rc = CounterMetricFamily("sgw_gateway_reconnects", "Broker reconnections.")
        rc.add_metric([], float(s.reconnects))
        yield rc
        sent = CounterMetricFamily("sgw_gateway_receipts", "Sealed receipts sent to devices.")
        sent.add_metric([], float(s.receipts_sent))
        yield sent
        rec = CounterMetricFamily("sgw_gateway_receipted", "Messages covered by receipts, by outcome.",
                                  labels=["outcome"])
        for outcome in ("accepted", "rejected"):
            rec.add_metric([outcome], float(s.receipted.get(outcome, 0)))
        yield rec
        lost = CounterMetricFamily("sgw_gateway_receipts_skipped",
                                   "Receipt outcomes not sent, by why (the device resends those).",
                                   labels=["why"])
        lost.add_metric(["bound"], float(s.receipts_dropped))
        lost.add_metric(["unsealable"], float(s.receipts_unsealable))
        yield lost
        yield _gauge("sgw_gateway_receipts_pending", "Devices owed a receipt right now.",
                     float(s.receipts_pending))

        refused = CounterMetricFamily("sgw_gateway_model_refused",
                                      "Model releases refused (at start-up or a SIGHUP), by reason.",
                                      labels=["reason"])
        for why in ReleaseReason:
            refused.add_metric([why.value], float(s.model_refused.get(why.value, 0)))
        yield refused
        swaps = CounterMetricFamily("sgw_gateway_model_swaps",
                                    "Models swapped to a new release while running (SIGHUP), by model.",
                                    labels=["model"])
        for model, _version in list(s.model_versions):
            swaps.add_metric([model], float(s.model_swaps.get(model, 0)))
        yield swaps
        versions = GaugeMetricFamily("sgw_gateway_model_info", "The model version that runs (1).",
                                     labels=["model", "version"])
        for model, version in list(s.model_versions):
            versions.add_metric([model, version], 1.0)
        yield versions

        info = GaugeMetricFamily("sgw_gateway_model_backend_info", "Backend each model runs on.",
                                 labels=["model", "backend", "requested"])
        for model, backend, requested in list(s.backends):
            info.add_metric([model, backend, requested], 1.0)
        yield info
        build = GaugeMetricFamily("sgw_gateway_build_info", "sgw version.", labels=["version"])
        build.add_metric([__version__], 1.0)
        yield build
        devices = GaugeMetricFamily("sgw_gateway_registry_devices", "Registry devices by status.",
                                    labels=["status"])
        for status in ("active", "revoked"):
            devices.add_metric([status], float(s.registry_devices.get(status, 0)))
        yield devices


def _by_labels(hists: Mapping[tuple[str, str], Hist]) -> dict[tuple[str, ...], Hist]:
    return {tuple(k): h for k, h in list(hists.items())}


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


def _hist(name: str, doc: str, labels: list[str],
          hists: Mapping[tuple[str, ...], Hist]) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=labels)
    for values, h in sorted(hists.items()):
        buckets, total = h.buckets()
        fam.add_metric(list(values), buckets, total)
    return fam


def make_registry(stats: GatewayStats, pipeline: Callable[[], PipelineCounters | None]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(stats, pipeline))
    ProcessCollector(registry=registry)
    return registry


def serve(registry: CollectorRegistry, host: str, port: int) -> object:
    """Starts /metrics in a daemon thread; returns the server (has shutdown())."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
