"""The shared generator: seeded, shaped as promised, and each fault shows the physics it claims."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.inference.features import extract, feature_names
from gateway.sim import FAULTS, Generator, Machine


def test_labels_start_with_healthy() -> None:
    assert FAULTS[0] == "healthy"
    assert {"imbalance", "looseness", "bearing", "shift", "misalignment"} <= set(FAULTS)


def test_same_seed_same_samples_other_seed_other_samples() -> None:
    a, ya = Generator(7).batch(24)
    b, yb = Generator(7).batch(24)
    c, _ = Generator(8).batch(24)
    assert np.array_equal(a, b) and np.array_equal(ya, yb)
    assert not np.array_equal(a, c)


def test_shapes_dtypes_and_balance() -> None:
    g = Generator(1, sample_rate_hz=3200.0, window=256)
    assert g.window("bearing").shape == (256, 3)
    x, y = g.batch(60)
    assert x.shape == (60, 256, 3) and x.dtype == np.float32 and y.dtype == np.int64
    assert np.bincount(y, minlength=len(FAULTS)).tolist() == [10] * len(FAULTS)
    _, y2 = g.batch(9, ["healthy", "bearing"])
    assert set(y2.tolist()) == {0, FAULTS.index("bearing")}
    assert np.isfinite(x).all()


def test_unknown_fault_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        Generator(1).window("gremlins")
    with pytest.raises(ValueError, match="unknown fault"):
        Generator(1).batch(3, ["healthy", "gremlins"])
    with pytest.raises(ValueError, match="bad schedule"):
        Machine(1, schedule=[(0.0, 1.0, "gremlins")])


def _mean_feature(label: str, name: str, n: int = 200) -> float:
    x, _ = Generator(11).batch(n, [label])
    return float(extract(x)[:, feature_names().index(name)].mean())


def test_faults_carry_their_signatures() -> None:
    healthy = {k: _mean_feature("healthy", k) for k in
               ("x.log_kurtosis", "x.log_crest", "x.band_15_35", "z.band_15_35", "x.skew", "x.band_150_220")}
    # impacts: peaky, heavy-tailed
    assert _mean_feature("bearing", "x.log_kurtosis") > healthy["x.log_kurtosis"] + 0.2
    assert _mean_feature("bearing", "x.log_crest") > healthy["x.log_crest"]
    # imbalance: more energy at shaft speed (1x lives in 15-35 Hz)
    assert _mean_feature("imbalance", "x.band_15_35") > healthy["x.band_15_35"] + 0.5
    # misalignment: the axis moves
    assert _mean_feature("misalignment", "z.band_15_35") > healthy["z.band_15_35"] + 0.5
    # looseness: one-sided clipping skews the waveform
    assert _mean_feature("looseness", "x.skew") > healthy["x.skew"] + 0.3
    # shift: the resonance moves down into 150-220 Hz
    assert _mean_feature("shift", "x.band_150_220") > healthy["x.band_150_220"] + 0.5


def test_machine_follows_its_schedule_and_is_reproducible() -> None:
    sched = [(1.0, 0.5, "bearing"), (3.0, 1.0, "imbalance")]
    m1, m2 = Machine(5, schedule=sched), Machine(5, schedule=sched)
    labels = []
    for k in range(60):
        t = k * 0.08
        w1, l1 = m1.next_window(t)
        w2, l2 = m2.next_window(t)
        assert np.array_equal(w1, w2) and l1 == l2 and w1.shape == (128, 3)
        labels.append(l1)
    assert labels[0] == "healthy"
    assert labels[13] == "bearing" and labels[19] == "healthy"  # 1.04 s in, 1.52 s out
    assert labels[40] == "imbalance" and labels[50] == "healthy"


def test_machine_stream_is_continuous() -> None:
    """Two consecutive windows look like one long window: shaft phase follows absolute time."""
    m_short, m_long = Machine(9, window=128), Machine(9, window=256)
    a, _ = m_short.next_window(2.0)
    b, _ = m_short.next_window(2.0 + 128 / 1600)
    joined = np.concatenate([a, b])
    long, _ = m_long.next_window(2.0)
    # noise differs between the two, the machine's harmonics must not
    corr = np.corrcoef(joined[:, 0], long[:, 0])[0, 1]
    assert corr > 0.8, corr
