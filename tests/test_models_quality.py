"""The committed int8 models meet issue 4's bar on fresh windows from a seed training never saw.

Training used seeds 101 (train), 202 (validation, threshold) and 303 (manifest report); this test draws
from HELD_OUT_SEED and runs the shipped .tflite files through the runtime engine. Figures are printed.
"""

from __future__ import annotations

import numpy as np
import pytest

from gateway.inference import features, load_manifest, load_model
from gateway.sim import FAULTS, Generator

HELD_OUT_SEED = 777_001
PER_CLASS = 500
EXTRA_HEALTHY = 2_500  # healthy windows dominate a real stream, and the forward rate needs resolution


@pytest.fixture(scope="module")
def held_out() -> tuple[np.ndarray, np.ndarray]:
    seeds = {m.training_seed for m in load_manifest().models.values()}
    assert HELD_OUT_SEED not in seeds | {202, 303}
    g = Generator(HELD_OUT_SEED)
    x, y = g.batch(PER_CLASS * len(FAULTS))
    xh, yh = g.batch(EXTRA_HEALTHY, ["healthy"])
    return np.concatenate([x, xh]), np.concatenate([y, yh])


def test_prefilter_forwards_faults_and_spares_healthy(held_out, capsys: pytest.CaptureFixture[str]) -> None:
    x, y = held_out
    pre = load_model("prefilter", accelerator="cpu")
    assert pre.threshold is not None
    forwarded = pre.predict(x)[:, 0] > pre.threshold
    healthy_rate = float(forwarded[y == 0].mean())
    fault_rate = float(forwarded[y != 0].mean())
    per_fault = {FAULTS[k]: float(forwarded[y == k].mean()) for k in range(1, len(FAULTS))}
    with capsys.disabled():
        counts = f"{int((y == 0).sum())} healthy / {int((y != 0).sum())} faulty"
        print(f"\nprefilter (seed {HELD_OUT_SEED}, {counts}):"
              f" healthy forwarded {healthy_rate:.4f}, faulty forwarded {fault_rate:.4f}, threshold "
              f"{pre.threshold:.3f}; per fault " + ", ".join(f"{k} {v:.3f}" for k, v in per_fault.items()))
    assert healthy_rate <= 0.05
    assert fault_rate >= 0.99
    assert per_fault["bearing"] >= 0.99  # impulse faults, which raw-sample autoencoders miss
    assert min(per_fault.values()) >= 0.97  # no fault class is quietly sacrificed to the average


def test_classifier_accuracy_and_int8_matches_float(held_out, capsys: pytest.CaptureFixture[str]) -> None:
    x, y = held_out
    int8 = load_model("classifier", accelerator="cpu").predict(x).argmax(axis=1)
    f32 = load_model("classifier_f32", accelerator="cpu").predict(x).argmax(axis=1)
    # balanced accuracy: the extra healthy windows must not flatter the figure
    recall = {FAULTS[k]: float((int8[y == k] == k).mean()) for k in range(len(FAULTS))}
    accuracy = float(np.mean(list(recall.values())))
    agreement = float((int8 == f32).mean())
    with capsys.disabled():
        print(f"\nclassifier (seed {HELD_OUT_SEED}, n={len(y)}): balanced accuracy {accuracy:.4f}, plain "
              f"accuracy {float((int8 == y).mean()):.4f}, float accuracy {float((f32 == y).mean()):.4f}, "
              f"int8/float agreement {agreement:.4f}; recall "
              + ", ".join(f"{k} {v:.3f}" for k, v in recall.items()))
    assert accuracy >= 0.97
    assert agreement >= 0.99


def test_manifest_records_the_quality_it_was_shipped_with() -> None:
    m = load_manifest()
    q = m.model("classifier").quality
    assert q["accuracy"] >= 0.97 and q["int8_float_agreement"] >= 0.99
    p = m.model("prefilter").quality
    assert p["healthy_forwarded"] <= 0.05 and p["faulty_forwarded"] >= 0.99
    assert p["curve"], "the trade-off curve is part of the manifest"


def test_generator_and_features_still_match_what_training_saw() -> None:
    """Recompute the training set's feature statistics: any drift in the generator or the features since
    the models were trained shows here, and means edge_models/train.py must be rerun."""
    prep = load_manifest().model("classifier").preprocessing
    g = Generator(load_manifest().model("classifier").training_seed)
    x, _ = g.batch(2000 * len(FAULTS))  # the recipe of train.py's data(TRAIN_SEED, 2000, 8000)
    xh, _ = g.batch(8000, ["healthy"])
    f = np.concatenate([features.extract(x, prep.sample_rate_hz, prep.bands_hz),
                        features.extract(xh, prep.sample_rate_hz, prep.bands_hz)])
    assert np.allclose(f.mean(axis=0), prep.mean, rtol=1e-4, atol=1e-4)
    assert np.allclose(f.std(axis=0) + 1e-6, prep.std, rtol=1e-4, atol=1e-4)


def test_per_device_baseline_on_held_out_machines(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 13's prefilter figures, on machines of a fleet seed development never used: each machine is
    commissioned on its own healthy windows, then judged on fresh windows of every class, including the
    gear-mesh fault that no part of the design knows."""
    from gateway.sim.evaluate import baseline_forward_rates
    from gateway.sim.physical import Fleet

    r = baseline_forward_rates(Fleet(777_013, 64), range(0, 64, 4))
    fwd = r["forwarded"]
    with capsys.disabled():
        print("\nbaseline, 16 held-out machines: " + ", ".join(f"{k} {v:.3f}" for k, v in fwd.items()))
    assert fwd["healthy"] <= 0.02
    for fault in ("imbalance", "misalignment", "looseness", "bearing", "shift"):
        assert fwd[fault] >= 0.95, fault
    assert fwd["gear"] >= 0.90
