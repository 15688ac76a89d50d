"""The per-device baseline (gateway/core/baseline.py): fit, calibrate, persist, refuse what is damaged."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.core import baseline
from gateway.core.baseline import BaselineError
from gateway.inference import features
from gateway.sim.physical import Fleet

SET = features.ORDER_SET


@pytest.fixture(scope="module")
def fitted() -> tuple[baseline.Baseline, Fleet]:
    fleet = Fleet(515, 2)
    return baseline.fit(features.extract_for_baseline(fleet.windows(0, "healthy", 300)), SET), fleet


def test_roundtrip_keeps_every_number(fitted) -> None:
    b, _ = fitted
    back = baseline.from_bytes(b.to_bytes(), SET)
    assert back.threshold == b.threshold and back.n_windows == 300
    assert np.array_equal(back.mean, b.mean) and np.array_equal(back.precision, b.precision)


@pytest.mark.parametrize("damage", ["flip", "truncate", "header", "version", "features", "empty"])
def test_damaged_or_mismatched_blob_is_refused(fitted, damage: str) -> None:
    blob = bytearray(fitted[0].to_bytes())
    if damage == "flip":
        blob[-5] ^= 0x40
    elif damage == "truncate":
        blob = blob[:-8]
    elif damage == "header":
        blob[0:1] = b"["
    elif damage == "version":
        blob = bytearray(bytes(blob).replace(b'"version": 1', b'"version": 9'))
    elif damage == "empty":
        blob = bytearray()
    feature_set = "vib-v1" if damage == "features" else SET
    with pytest.raises(BaselineError):
        baseline.from_bytes(bytes(blob), feature_set)


def test_fit_refuses_too_few_or_non_finite_windows() -> None:
    with pytest.raises(BaselineError):
        baseline.fit(np.zeros((10, 74)), SET)
    bad = np.random.default_rng(0).normal(size=(200, 10))
    bad[3, 2] = np.nan
    with pytest.raises(BaselineError):
        baseline.fit(bad, SET)


def test_threshold_meets_its_target_on_fresh_healthy_windows(fitted) -> None:
    """Calibrated on out-of-fold distances, so fresh windows forward about target_rate, not far more."""
    b, fleet = fitted
    d = b.distance(features.extract_for_baseline(fleet.windows(0, "healthy", 400, stream=7)))
    assert float((d > b.threshold).mean()) <= 0.03


def test_another_machine_is_not_this_machines_normal(fitted) -> None:
    b, fleet = fitted
    d = b.distance(features.extract_for_baseline(fleet.windows(1, "healthy", 50, stream=1)))
    assert float((d > b.threshold).mean()) >= 0.9
