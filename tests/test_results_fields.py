"""One result, two encodings (issue 20: result fields listed once): the JSON document says what the
protobuf says, field for field, including the nested baseline pair and its null forms."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gateway.core.pipeline import Item
from gateway.pb import messages_pb2 as pb
from gateway.server import results


class _Model:
    name, version, backend = "classifier", "2.0.0", "cpu"
    labels = ("healthy", "imbalance", "bearing")


def _item(distance: float, threshold: float) -> Item:
    w = pb.TelemetryWindow(window_seq=9, start_ns=123, prefilter_score=distance, gap=True, reason=1,
                           prefilter_version="baseline-v1" if threshold else "",
                           baseline_threshold=threshold)
    return Item("dev-1", 5, 77, 1, w, np.zeros((1, 3), np.float32), 0, 456, 0)


@pytest.mark.parametrize(("distance", "threshold"), [(2.5, 3.0), (0.0, 0.0)])
def test_protobuf_and_json_carry_the_same_fields(distance: float, threshold: float) -> None:
    f = results.fields(_Model(), _item(distance, threshold), [0.1, 0.7, 0.2], 1, published_ns=789,
                       inference_us=900, batch_size=4)
    msg = pb.InferenceResult.FromString(results.encode(f))
    doc = json.loads(results.to_json(f))
    for key in results.JSON_FIELDS:
        got = getattr(msg, key)
        want = doc[key]
        assert (list(got) == pytest.approx(want)) if key == "scores" else (got == pytest.approx(want)), key
    assert msg.label == "imbalance" and (msg.inference_us, msg.batch_size) == (900, 4)
    if threshold:
        assert doc["baseline"] == {"distance": pytest.approx(msg.baseline_distance),
                                   "threshold": pytest.approx(msg.baseline_threshold)}
    else:
        assert doc["baseline"] is None and msg.baseline_distance == msg.baseline_threshold == 0
