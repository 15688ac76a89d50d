"""The classifier's closed answer set (gateway/inference/decision.py): gate, best fault, unknown."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from gateway.inference.decision import BASELINE_PREFIX, OpenSet, baseline_of, confidence, decide, gate_of
from gateway.pb import messages_pb2 as pb

LABELS = ("healthy", "imbalance", "bearing", "unknown")
# columns: healthy, imbalance, bearing probabilities, then the unknown score (> 1: far from every fault)
SCORES = np.array([[0.7, 0.2, 0.1, 0.5],   # near, classifier says healthy
                   [0.7, 0.2, 0.1, 3.0],   # far, but healthy: never unknown
                   [0.1, 0.8, 0.1, 0.5],   # near, imbalance
                   [0.1, 0.8, 0.1, 3.0]],  # far: unknown
                  dtype=np.float32)


@dataclass
class W:
    reason: int
    prefilter_version: str
    prefilter_score: float


def test_without_a_gate_the_classifier_decides_and_only_a_fault_can_be_unknown() -> None:
    assert decide(LABELS, SCORES) == [0, 0, 1, 3]


def test_the_per_device_gate_decides_normal_versus_fault() -> None:
    normal = decide(LABELS, SCORES, ["normal"] * 4)
    assert normal == [0, 0, 0, 0]
    # an anomaly is a fault: the best fault class, or unknown when far from every learned fault
    assert decide(LABELS, SCORES, ["anomaly"] * 4) == [1, 3, 1, 3]
    assert decide(LABELS, SCORES, [None, "anomaly", "normal", None]) == [0, 3, 0, 3]


def test_a_model_without_an_open_set_rule_is_a_plain_argmax() -> None:
    assert decide(LABELS[:3], SCORES[:, :3], ["anomaly"] * 4) == [0, 0, 1, 1]


def test_confidence_is_the_answered_class_probability() -> None:
    assert confidence(LABELS, SCORES[2].tolist(), 1) == pytest.approx(0.8)
    assert confidence(LABELS, SCORES[3].tolist(), 3) == pytest.approx(0.8)  # the refused best fault's
    assert confidence(LABELS[:3], SCORES[0, :3].tolist(), 0) == pytest.approx(0.7)


def test_gate_of_trusts_only_a_per_device_baseline_that_has_judged() -> None:
    base = f"{BASELINE_PREFIX}vib-v1+ord1"
    assert gate_of(W(pb.FORWARD_REASON_ANOMALY, base, 9.0)) == "anomaly"
    assert gate_of(W(pb.FORWARD_REASON_SUMMARY, base, 2.0)) == "normal"
    assert gate_of(W(pb.FORWARD_REASON_SUMMARY, base, 0.0)) is None  # still commissioning
    assert gate_of(W(pb.FORWARD_REASON_ANOMALY, "prefilter-1.0.0", 3.0)) is None  # a global prefilter
    assert gate_of(W(pb.FORWARD_REASON_UNSPECIFIED, base, 1.0)) is None
    assert gate_of(pb.TelemetryWindow(reason=pb.FORWARD_REASON_ANOMALY, prefilter_version=base)) == "anomaly"


def test_open_set_distance_and_manifest_checks() -> None:
    d = {"classes": ["imbalance"], "centroids": [[0.0, 0.0]], "whiteners": [[[1.0, 0.0], [0.0, 2.0]]],
         "threshold": 2.0}
    o = OpenSet.from_manifest(d, LABELS[:3], 2)
    z = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    assert o.distance(z) == pytest.approx([0.0, np.sqrt(2.0), np.sqrt(8.0)])
    assert o.unknown_score(z) == pytest.approx([0.0, np.sqrt(2.0) / 2, np.sqrt(8.0) / 2])
    with pytest.raises(ValueError, match="not among"):
        OpenSet.from_manifest({**d, "classes": ["gear"]}, LABELS[:3], 2)
    with pytest.raises(ValueError, match="shaped"):
        OpenSet.from_manifest(d, LABELS[:3], 3)
    with pytest.raises(ValueError, match="positive"):
        OpenSet.from_manifest({**d, "threshold": 0.0}, LABELS[:3], 2)


def test_baseline_of_is_the_agents_distance_and_threshold_where_a_baseline_judged() -> None:
    base = f"{BASELINE_PREFIX}vib-v1+ord1"

    def w(reason: int, version: str, score: float, threshold: float = 0.0) -> pb.TelemetryWindow:
        return pb.TelemetryWindow(reason=reason, prefilter_version=version, prefilter_score=score,
                                  baseline_threshold=threshold)
    assert baseline_of(w(pb.FORWARD_REASON_ANOMALY, base, 9.0, 4.5)) == (9.0, 4.5)
    assert baseline_of(w(pb.FORWARD_REASON_SUMMARY, base, 2.0, 4.5)) == (2.0, 4.5)
    assert baseline_of(w(pb.FORWARD_REASON_ANOMALY, base, 9.0)) == (9.0, 0.0)  # an agent without the field
    assert baseline_of(w(pb.FORWARD_REASON_SUMMARY, base, 0.0)) == (0.0, 0.0)  # still commissioning
    assert baseline_of(w(pb.FORWARD_REASON_ANOMALY, "prefilter-1.0.0", 3.0, 1.0)) == (0.0, 0.0)
    # an older gateway's parser skips the new field: the rest of the window reads the same
    old = pb.TelemetryWindow(reason=pb.FORWARD_REASON_ANOMALY, prefilter_version=base, prefilter_score=9.0)
    new = w(pb.FORWARD_REASON_ANOMALY, base, 9.0, 4.5)
    assert new.SerializeToString().startswith(old.SerializeToString())
    assert new.SerializeToString()[len(old.SerializeToString()):] == b"\x65" + np.float32(4.5).tobytes()
