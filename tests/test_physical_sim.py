"""The physically varied fleet (gateway/sim/physical.py): reproducible, varied, and its sensor chain bites."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.inference import features
from gateway.sim.physical import LABELS, Fleet, synth


def test_same_seed_same_windows_and_streams_differ() -> None:
    a, b = Fleet(3, 4), Fleet(3, 4)
    assert np.array_equal(a.windows(2, "bearing", 5), b.windows(2, "bearing", 5))
    assert not np.array_equal(a.windows(2, "bearing", 5, stream=0), a.windows(2, "bearing", 5, stream=1))


def test_dataset_shapes_labels_and_machine_ids() -> None:
    x, y, m = Fleet(3, 3).dataset([0, 2], 4)
    assert x.shape == (2 * len(LABELS) * 4, 128, 3) and x.dtype == np.float32
    assert set(y.tolist()) == set(range(len(LABELS))) and set(m.tolist()) == {0, 2}


def test_adc_quantises_and_saturates_at_the_machines_range() -> None:
    fleet = Fleet(9, 16)
    m = next(mm for mm in fleet.machines if mm.range_g == 4.0)
    big = m.__class__(**{**m.__dict__, "a1": 20.0})
    x = synth(big, "healthy", np.random.default_rng(0))
    lsb = 8.0 / 65536
    assert np.abs(x).max() <= 4.0 and np.isclose(np.abs(x).max(), 4.0, atol=2 * lsb)
    assert np.allclose(np.round(x / lsb) * lsb, x)


def test_speed_varies_per_window_within_the_machines_range() -> None:
    fleet = Fleet(11, 8)
    est = features.estimate_speed_hz(fleet.windows(0, "healthy", 40)) * 60
    m = fleet.machines[0]
    assert est.std() > 20.0  # not a fixed speed
    assert np.median(est) == pytest.approx((m.rpm_lo + m.rpm_hi) / 2, rel=0.35)


def test_machines_differ_in_structure_and_sensor() -> None:
    ms = Fleet(12, 32).machines
    assert np.ptp([m.mode_hz for m in ms]) > 200 and {m.range_g for m in ms} == {4.0, 16.0}
    assert np.ptp([m.rpm_lo for m in ms]) > 600


def test_unknown_label_is_refused() -> None:
    with pytest.raises(ValueError):
        Fleet(1, 1).windows(0, "rust", 1)
