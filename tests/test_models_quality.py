"""The committed int8 models meet their bar on fresh windows from seeds and machines training never saw.

Training used seeds 101 (train), 202 (validation, thresholds) and 303 (manifest report); these tests
draw from HELD_OUT_SEED (the old generator) and from machines of fleet seed 777013 (the physical fleet,
issue 13), and run the shipped .tflite files through the runtime engine. Figures are printed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from gateway.inference import default_manifest_path, features, load_manifest, load_model
from gateway.sim import FAULTS, Generator
from gateway.sim.evaluate import classifier_figures, classifier_on_fleet
from gateway.sim.physical import Fleet

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


def test_classifier_on_the_old_generator_and_int8_matches_float(held_out,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    x, y = held_out
    clf = load_model("classifier", accelerator="cpu")
    scores = clf.predict(x)
    f = classifier_figures(clf.labels, scores, y)  # balanced: the extra healthy windows must not flatter it
    f32 = load_model("classifier_f32", accelerator="cpu").predict(x)
    agreement = float((scores[:, :len(FAULTS)].argmax(1) == f32[:, :len(FAULTS)].argmax(1)).mean())
    with capsys.disabled():
        print(f"\nclassifier, generator seed {HELD_OUT_SEED} (n={len(y)}): balanced accuracy "
              f"{f['balanced_accuracy']:.4f}, int8/float agreement {agreement:.4f}; recall "
              + ", ".join(f"{k} {v:.3f}" for k, v in f["per_class_recall"].items())
              + f"; unknown {float(np.mean(list(f['unknown_rate'].values()))):.4f}")
    assert f["balanced_accuracy"] >= 0.96
    assert max(f["unknown_rate"].values()) <= 0.05
    assert agreement >= 0.98


def test_classifier_on_held_out_machines(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 13's classifier figures on 16 machines of the held-out fleet (every 4th of 64), with the gear
    fault no part of the design saw. Gated: as in service, each machine commissioned and its baseline's
    verdict deciding normal versus fault; alone: the stateless classifier by itself. The bounds are
    today's honest figures less a margin; the gear -> unknown acceptance (>= 0.80) is NOT met (README)."""
    clf = load_model("classifier", accelerator="cpu")
    r = classifier_on_fleet(clf, Fleet(777_013, 64), range(0, 64, 4), 40)
    with capsys.disabled():
        for mode in ("gated", "alone"):
            f, u = r[mode], r[mode]["unknown_rate"]
            print(f"\nclassifier {mode}, 16 held-out machines: balanced accuracy"
                  f" {f['balanced_accuracy']:.4f};"
                  " recall " + ", ".join(f"{k} {v:.3f}" for k, v in f["per_class_recall"].items())
                  + f"; gear unknown {u['gear']:.3f}, healthy unknown {u['healthy']:.3f}")
    g, u = r["gated"], r["gated"]["unknown_rate"]
    assert g["balanced_accuracy"] >= 0.90  # issue 13's acceptance, on machines training never saw
    assert min(g["per_class_recall"].values()) >= 0.80
    assert u["gear"] >= 0.30  # answered unknown rather than a wrong known class (0.37 today)
    assert u["healthy"] <= 0.01
    assert max(u[k] for k in FAULTS) <= 0.05
    assert r["alone"]["balanced_accuracy"] >= 0.83


def test_manifest_records_the_quality_it_was_shipped_with() -> None:
    m = load_manifest()
    q = m.model("classifier").quality
    assert q["fleet_gated"]["balanced_accuracy"] >= 0.90 and q["fleet"]["balanced_accuracy"] >= 0.84
    assert q["generator"]["balanced_accuracy"] >= 0.96
    assert q["fleet_gated"]["unknown_rate"]["gear"] >= 0.35 and q["int8_float_agreement"] >= 0.98
    assert m.model("classifier").open_set is not None
    p = m.model("prefilter").quality
    assert p["healthy_forwarded"] <= 0.05 and p["faulty_forwarded"] >= 0.99
    assert p["curve"], "the trade-off curve is part of the manifest"
    assert all(v.path.stat().st_size <= 64 * 1024 for s in m.models.values() for v in s.variants)


def test_generator_and_features_still_match_what_training_saw() -> None:
    """Recompute the prefilter's training feature statistics and the classifier's fingerprint: any drift
    in the simulators or the features since the models were trained shows here, and means
    edge_models/train.py must be rerun."""
    prep = load_manifest().model("prefilter").preprocessing
    g = Generator(load_manifest().model("prefilter").training_seed)
    x, _ = g.batch(2000 * len(FAULTS))  # the recipe of train.py's data(TRAIN_SEED, 2000, 8000)
    xh, _ = g.batch(8000, ["healthy"])
    f = np.concatenate([features.extract(x, prep.sample_rate_hz, prep.bands_hz),
                        features.extract(xh, prep.sample_rate_hz, prep.bands_hz)])
    assert np.allclose(f.mean(axis=0), prep.mean, rtol=1e-4, atol=1e-4)
    assert np.allclose(f.std(axis=0) + 1e-6, prep.std, rtol=1e-4, atol=1e-4)
    fp = json.loads(default_manifest_path().read_text())["models"]["classifier"]["fingerprint"]
    xf, _, _ = Fleet(fp["fleet_seed"], fp["machines"]).dataset(range(fp["machines"]), fp["per_class"], FAULTS,
                                                              stream=fp["stream"])
    xg, _ = Generator(fp["generator_seed"]).batch(fp["generator_windows"])
    cprep = load_manifest().model("classifier").preprocessing
    fc = features.extract_set(cprep.features, np.concatenate([xf, xg]), cprep.sample_rate_hz, cprep.bands_hz)
    assert np.allclose(fc.mean(axis=0), fp["mean"], rtol=1e-4, atol=1e-4)


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
