"""What one result says, in one place: the fields of an `InferenceResult`, and its two encodings (the
protobuf the gateway publishes and stores, and the optional JSON document on `sgw/v1/results/json/ID`).
Pure: the shell calls it once per window of a batch.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from gateway.core.pipeline import Item
from gateway.inference.decision import baseline_of, confidence
from gateway.pb import messages_pb2 as pb


class Labelled(Protocol):
    name: str
    version: str
    labels: tuple[str, ...]
    backend: str


# InferenceResult fields the JSON document carries as they are (the baseline pair is nested there).
JSON_FIELDS = ("device_id", "window_seq", "epoch", "counter", "model_id", "model_version", "backend",
               "label", "scores", "window_start_ns", "received_ns", "published_ns", "gap", "confidence")


def fields(model: Labelled, it: Item, scores: list[float], best: int, *, published_ns: int,
           inference_us: int, batch_size: int) -> dict[str, Any]:
    """The InferenceResult of one window as keyword arguments (protobuf field names)."""
    labels = model.labels
    w = it.window
    distance, threshold = baseline_of(w)
    return {
        "device_id": it.device_id, "window_seq": w.window_seq, "epoch": it.epoch, "counter": it.counter,
        "model_id": model.name, "model_version": model.version, "backend": model.backend,
        "label": labels[best] if best < len(labels) else str(best), "scores": scores,
        "window_start_ns": w.start_ns, "received_ns": it.received_ns, "published_ns": published_ns,
        "inference_us": inference_us, "batch_size": batch_size, "prefilter_score": w.prefilter_score,
        "confidence": confidence(labels, scores, best), "gap": w.gap,
        "baseline_distance": distance, "baseline_threshold": threshold,
    }


def encode(f: dict[str, Any]) -> bytes:
    return pb.InferenceResult(**f).SerializeToString()


def to_json(f: dict[str, Any]) -> str:
    doc = {k: f[k] for k in JSON_FIELDS}
    distance, threshold = f["baseline_distance"], f["baseline_threshold"]
    # the agent's per-device baseline on this window; null when none judged it
    doc["baseline"] = ({"distance": distance, "threshold": threshold or None}
                       if distance or threshold else None)
    return json.dumps(doc, separators=(",", ":"))
