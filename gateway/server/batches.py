"""One inference batch from the pipeline to a stored result: the models, the per-window decision, the
batch transaction, the pipeline's outcome and the statistics. No MQTT here: `process` returns what the
MQTT shell must send (acks, the stored ResultBatch, best-effort JSON documents), and the shell does it.

Runs on the shell's network thread (gateway/server/shell.py says why one thread): the store connection
and the models are this thread's alone. A model swap (SIGHUP) is handed over as one reference and taken
between two batches, so a batch is inferred by one model whole.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from gateway.core.pipeline import BatchReady, Item, Pipeline
from gateway.core.topics import RESULTS_JSON_PREFIX
from gateway.inference.decision import decide, gate_of
from gateway.pb import messages_pb2 as pb
from gateway.server import results
from gateway.server.metrics import GatewayStats
from gateway.server.receipts import Receipts
from gateway.server.store import ResultStore

log = logging.getLogger("sgw.gateway")
_time_ns = time.time_ns
_perf_ns = time.perf_counter_ns


class ModelLike(Protocol):
    name: str
    version: str
    labels: tuple[str, ...]
    backend: str

    def predict(self, x: npt.ArrayLike) -> npt.NDArray[np.float32]: ...


class SparkplugSink(Protocol):
    def results(self, model: ModelLike, items: list[Item], scores: npt.NDArray[np.float32],
                keep: list[bool]) -> None: ...

    def status(self, device_id: str, status: pb.DeviceStatus) -> None: ...


@dataclass(slots=True)
class Processed:
    """What the shell sends for one batch, in this order: ack `late` (processed by another instance, no
    result), hand `stored` (pending id, ResultBatch) to MQTT, ack `kept`, publish `extras` at QoS 0."""

    late: list[int] = field(default_factory=list)  # input ack tags
    kept: list[int] = field(default_factory=list)
    stored: tuple[int, bytes] | None = None
    extras: list[tuple[str, str]] = field(default_factory=list)  # (topic, JSON document)


class BatchProcessor:
    def __init__(self, *, models: Mapping[str, ModelLike], store: ResultStore, stats: GatewayStats,
                 pipeline: Pipeline, results_json: bool) -> None:
        self.models = dict(models)
        self._store = store
        self._stats = stats
        self._pipeline = pipeline
        self._results_json = results_json
        self.receipts: Receipts | None = None
        # Optional Sparkplug B output (gateway/server/sparkplug.py): handed each stored batch; it only
        # queues them, its own thread does the rest.
        self.sparkplug: SparkplugSink | None = None

    def swap(self, swap: Mapping[str, ModelLike]) -> None:
        """Run these (already loaded) models from the next batch on (called between two batches)."""
        before = {n: m.version for n, m in self.models.items()}
        self.models = {**self.models, **swap}
        st = self._stats
        st.model_versions = [(n, m.version) for n, m in self.models.items()]
        st.backends = [(n, m.backend, r) for n, _b, r in st.backends
                       if (m := self.models.get(n)) is not None]
        for name, model in swap.items():
            st.model_swaps[name] = st.model_swaps.get(name, 0) + 1
            log.info("model swapped", extra={"fields": {"model": name, "from": before.get(name),
                                                         "to": model.version, "backend": model.backend}})

    def process(self, batch: BatchReady) -> Processed:
        model = self.models[batch.route]
        items = batch.items
        x = np.stack([it.samples for it in items])
        t0 = _perf_ns()
        scores = model.predict(x)
        infer_ns = _perf_ns() - t0
        best = decide(model.labels, scores, [gate_of(it.window) for it in items])
        published_ns = _time_ns()
        docs = self._fields(model, items, scores, best=best, infer_ns=infer_ns, published_ns=published_ns)
        keys = [(it.device_id, it.epoch, it.counter, it.key_id) for it in items]
        pending_id, keep, payload = self._store.commit(keys, [results.encode(d) for d in docs], published_ns)
        if self.receipts is not None:
            # Committed (results and replay state): each window may now be receipted, kept or late.
            self.receipts.on_committed(items, published_ns)
        outcome = self._pipeline.committed(items, keep)
        out = Processed(late=[it.tag for it in outcome.late])
        if pending_id is None or payload is None:
            return out
        # Stored durably: the inputs can be acked whether or not the result goes to the broker now.
        out.stored = (pending_id, payload)
        out.kept = [it.tag for it in outcome.kept]
        if self.sparkplug is not None:
            self.sparkplug.results(model, items, scores, keep)
        self._count(model, docs, keep, outcome.kept, published_ns=published_ns, infer_ns=infer_ns,
                    batch_size=len(items))
        if self._results_json:
            out.extras = [(RESULTS_JSON_PREFIX + d["device_id"], results.to_json(d))
                          for d, k in zip(docs, keep, strict=True) if k]
        return out

    def _fields(self, model: ModelLike, items: list[Item], scores: npt.NDArray[np.float32], *,
                best: list[int], infer_ns: int, published_ns: int) -> list[dict[str, Any]]:
        """Each item's result fields (gateway/server/results.py), for the protobuf and the JSON."""
        inference_us = min(infer_ns // 1000, 0xFFFFFFFF)
        rows = scores.tolist()
        n = len(items)
        return [results.fields(model, it, rows[i], best[i], published_ns=published_ns,
                               inference_us=inference_us, batch_size=n) for i, it in enumerate(items)]

    def _count(self, model: ModelLike, docs: list[dict[str, Any]], keep: list[bool], kept: list[Item], *,
               published_ns: int, infer_ns: int, batch_size: int) -> None:
        stats = self._stats
        by_label = stats.results
        for d, k in zip(docs, keep, strict=True):
            if k:
                key = (model.name, d["label"])
                by_label[key] = by_label.get(key, 0) + 1
        # A device clock ahead of ours would give negative latencies; they count as zero.
        stats.e2e.observe_many(max(0, published_ns - it.end_ns) / 1e9 for it in kept)
        stats.processing.observe_many((published_ns - it.received_ns) / 1e9 for it in kept)
        stats.batch_hist(model.name).observe(batch_size)
        stats.inference_hist(model.name, model.backend).observe(infer_ns / 1e9)
