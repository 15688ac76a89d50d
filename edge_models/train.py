"""Train the two edge models, convert them to full-int8 LiteRT files and write manifest.json.

Run with the training venv (TensorFlow only lives there; nothing that runs sgw imports it):

    /opt/tfvenv/bin/pip install -e /work/main --no-deps     # once: the generator and features
    /opt/tfvenv/bin/python edge_models/train.py              # ~1-2 min on 2 cores
    (or any venv with `pip install -e '.[train]'`)

Model building, fitting and int8 conversion (gateway/inference/keras_models.py), the open-set prototypes,
thresholds and model file entries (gateway/inference/training.py) are shared with `sgw model train`.

Data come from gateway.sim.Generator with fixed seeds (train / validation / held-out report), features
from gateway.inference.features, so the runtime preprocesses exactly as here. The prefilter threshold is
chosen on validation data; the manifest's quality figures come from the held-out seed, measured through
gateway.inference.engine on the int8 files that ship.

The classifier (issue 13) learns from both simulators: the old generator and the varied physical fleet
(gateway.sim.physical, CLF_TRAIN_MACHINES machines of fleet seed 101, the gear fault held out). Its
`unknown` rule (gateway/inference/decision.py) is calibrated on other machines (fleet seed 202, known
classes only: the held-out fault is never used to choose anything) and reported on a third set
(fleet seed 303, generator seed 303).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TF is imported below

import numpy as np
import tensorflow as tf

from gateway.inference import features
from gateway.inference.engine import load_model
from gateway.inference.keras_models import build, convert, fit
from gateway.inference.training import choose_threshold, open_set, write_model
from gateway.sim import FAULTS, Generator
from gateway.sim.evaluate import classifier_figures, classifier_on_fleet
from gateway.sim.physical import HELD_OUT, LABELS, Fleet

HERE = Path(__file__).resolve().parent
TRAIN_SEED, VAL_SEED, REPORT_SEED = 101, 202, 303
VERSION = "1.0.0"
CLF_VERSION = "2.0.0"  # issue 13: two simulators, order features, open-set unknown
CLASSIFIER_BATCHES = (1, 8, 32, 64)
PREFILTER_BATCHES = (1,)
# The validation budget for healthy windows forwarded (2 %; the issue allows 5 % on held-out data) and the
# fault recall target: gateway.inference.training.choose_threshold, shared with `sgw model train`.
CLF_FEATURES = features.ORDER_SET
CLF_TRAIN_MACHINES, CLF_TRAIN_PER_CLASS = 256, 24
CLF_GEN_PER_CLASS = 1500
# The share of known-fault windows of validation machines that the open-set rule may call unknown.
UNKNOWN_BUDGET = 0.01


def data(seed: int, per_class: int, healthy_extra: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = Generator(seed)
    x, y = g.batch(per_class * len(FAULTS))
    if healthy_extra:
        xh, yh = g.batch(healthy_extra, ["healthy"])
        x, y = np.concatenate([x, xh]), np.concatenate([y, yh])
    return x, y, features.extract(x)


def clf_data(fleet_seed: int, machines: int, per_class: int, gen_seed: int, gen_per_class: int,
             labels: tuple[str, ...] = FAULTS, stream: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Classifier features from both simulators: y indexes LABELS (gear = len(FAULTS)); src 0 fleet, 1 gen."""
    xf, yf, _ = Fleet(fleet_seed, machines).dataset(range(machines), per_class, labels, stream=stream)
    xg, yg = Generator(gen_seed).batch(gen_per_class * len(FAULTS))
    f = np.concatenate([features.extract_set(CLF_FEATURES, xf), features.extract_set(CLF_FEATURES, xg)])
    return f, np.concatenate([yf, yg]), np.concatenate([np.zeros(len(yf), int), np.ones(len(yg), int)])


def fingerprint() -> dict:
    """Mean features of a few fixed training windows: tests recompute it to catch a simulator or feature
    change since training without regenerating the whole training set."""
    xf, _, _ = Fleet(TRAIN_SEED, 4).dataset(range(4), 5, FAULTS, stream=0)
    xg, _ = Generator(TRAIN_SEED).batch(60)
    f = features.extract_set(CLF_FEATURES, np.concatenate([xf, xg]))
    return {"fleet_seed": TRAIN_SEED, "machines": 4, "per_class": 5, "stream": 0,
            "generator_seed": TRAIN_SEED, "generator_windows": 60, "mean": [float(v) for v in f.mean(axis=0)]}


def clf_quality(m, z: np.ndarray, y: np.ndarray, src: np.ndarray, seed: int) -> dict:
    """Per source (fleet, generator) the held-out figures of gateway.sim.evaluate.classifier_figures."""
    scores = m.score_features(z)
    return {"seed": seed, **{name: classifier_figures(m.labels, scores[src == k], y[src == k])
                             for k, name in enumerate(("fleet", "generator"))}}


def curve(scores: np.ndarray, y: np.ndarray, thresholds: list[float]) -> list[dict]:
    rows = []
    for t in thresholds:
        fwd = scores > t
        row = {"threshold": round(t, 4), "healthy_forwarded": float(fwd[y == 0].mean()),
               "faulty_forwarded": float(fwd[y != 0].mean())}
        row.update({f"{FAULTS[k]}_forwarded": float(fwd[y == k].mean()) for k in range(1, len(FAULTS))})
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--per-class", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=60)
    args = ap.parse_args()

    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.keras.utils.set_random_seed(TRAIN_SEED)
    tf.config.experimental.enable_op_determinism()

    _, ytr, ftr = data(TRAIN_SEED, args.per_class, healthy_extra=args.per_class * 4)
    mean, std = ftr.mean(axis=0), ftr.std(axis=0) + 1e-6
    ztr = features.standardize(ftr, mean, std)
    nf = ztr.shape[1]
    prep = {"features": features.FEATURE_SET, "sample_rate_hz": 1600.0, "window": 128,
            "bands_hz": list(features.BANDS_HZ),
            "mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    rep = ztr[np.random.default_rng(TRAIN_SEED).permutation(len(ztr))[:512]]

    def make_pre(b):
        return build(nf, 12, 1, activation=None, batch=b)

    # classifier: both simulators, order-normalised features, the held-out fault not in training
    fc, yc, srcc = clf_data(TRAIN_SEED, CLF_TRAIN_MACHINES, CLF_TRAIN_PER_CLASS, TRAIN_SEED,
                            CLF_GEN_PER_CLASS, stream=0)
    cmean, cstd = fc.mean(axis=0), fc.std(axis=0) + 1e-6
    zc = features.standardize(fc, cmean, cstd)
    ncf = zc.shape[1]
    cprep = {**prep, "features": CLF_FEATURES, "mean": [float(v) for v in cmean],
             "std": [float(v) for v in cstd]}
    crep = zc[np.random.default_rng(TRAIN_SEED).permutation(len(zc))[:512]]

    def make_clf(b):
        return build(ncf, 32, len(FAULTS), activation="softmax", batch=b, layers=2)

    clf = make_clf(None)
    # each (source, class) weighs the same: the fleet's variety must not drown in generator windows
    groups = srcc * len(FAULTS) + yc
    counts = np.bincount(groups, minlength=2 * len(FAULTS))
    fit(clf, zc, yc, loss="sparse_categorical_crossentropy", epochs=args.epochs,
        sample_weight=(len(yc) / (2 * len(FAULTS) * counts))[groups].astype(np.float32))
    tf.keras.utils.set_random_seed(TRAIN_SEED)  # the prefilter's start does not depend on the classifier
    pre = make_pre(None)
    # healthy and faulty windows weigh the same in total, whatever the mix
    healthy = ytr == 0
    sw = np.where(healthy, 0.5 / healthy.mean(), 0.5 / (1 - healthy.mean())).astype(np.float32)
    fit(pre, ztr, (~healthy).astype(np.float32), loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
        epochs=args.epochs, sample_weight=sw)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    base = {"version": VERSION, "training_seed": TRAIN_SEED, "validation_seed": VAL_SEED,
            "preprocessing": prep}
    cbase = {**base, "version": CLF_VERSION, "preprocessing": cprep, "fingerprint": fingerprint(),
             "training_data": {"fleet_seed": TRAIN_SEED, "fleet_machines": CLF_TRAIN_MACHINES,
                               "fleet_per_class": CLF_TRAIN_PER_CLASS, "generator_seed": TRAIN_SEED,
                               "generator_per_class": CLF_GEN_PER_CLASS, "held_out_faults": list(HELD_OUT)}}
    oset = open_set(zc, yc, list(FAULTS))
    models = {
        "classifier": {**cbase, "labels": list(FAULTS), "threshold": None, "output": "probabilities",
                       "open_set": oset,
                       "variants": [write_model(out, f"classifier_b{b}.tflite",
                                                convert(clf, make_clf, crep, batch=b, int8=True), b)
                                    for b in CLASSIFIER_BATCHES]},
        # float twin of the classifier: only to measure what int8 costs; never deployed
        "classifier_f32": {**cbase, "labels": list(FAULTS), "threshold": None, "output": "probabilities",
                           "open_set": oset,
                           "variants": [write_model(out, "classifier_f32_b64.tflite",
                                                    convert(clf, make_clf, crep, batch=64, int8=False), 64)]},
        "prefilter": {**base, "labels": ["anomaly"], "threshold": 0.0, "output": "logit",
                      "variants": [write_model(out, f"prefilter_b{b}.tflite",
                                               convert(pre, make_pre, rep, batch=b, int8=True), b)
                                   for b in PREFILTER_BATCHES]},
    }
    manifest_path = out / "manifest.json"
    manifest = {"format": 1, "generator": "gateway.sim.generator", "models": models}
    manifest_path.write_text(json.dumps(manifest) + "\n")

    # Everything below measures the int8 files that ship, through the runtime's own engine.
    pre_m = load_model("prefilter", manifest=manifest_path, accelerator="cpu")
    xv, yv, _ = data(VAL_SEED, 600, healthy_extra=3000)
    sv = pre_m.predict(xv)[:, 0]
    step = float(pre_m.output_scale)
    # int8 scores sit on multiples of the output scale; a threshold halfway between two of them cannot
    # flip with float rounding
    threshold = (np.floor(choose_threshold(sv, yv == 0) / step) + 0.5) * step
    models["prefilter"]["threshold"] = threshold

    xr, yr, _ = data(REPORT_SEED, 1000, healthy_extra=4000)
    sr = pre_m.predict(xr)[:, 0]
    table = curve(sr, yr, [threshold + k * step for k in range(-8, 9, 2)])
    models["prefilter"]["quality"] = {"seed": REPORT_SEED, "n": len(yr), **curve(sr, yr, [threshold])[0],
                                      "curve": table}
    # unknown threshold: on validation machines (fleet 202, generator 202), known classes only
    clf_m = load_model("classifier", manifest=manifest_path, accelerator="cpu")
    fv, yv_c, _ = clf_data(VAL_SEED, 32, 40, VAL_SEED, 500)
    dv = clf_m.open_set.distance(features.standardize(fv[yv_c > 0], cmean, cstd))
    t_unknown = float(np.quantile(dv, 1.0 - UNKNOWN_BUDGET))
    for name in ("classifier", "classifier_f32"):
        models[name]["open_set"] = {**oset, "threshold": t_unknown, "budget": UNKNOWN_BUDGET,
                                    "calibration": {"fleet_seed": VAL_SEED, "machines": 32, "per_class": 40,
                                                    "generator_seed": VAL_SEED, "known_faults_only": True}}
    manifest_path.write_text(json.dumps(manifest) + "\n")
    clf_m = load_model("classifier", manifest=manifest_path, accelerator="cpu")
    f32_m = load_model("classifier_f32", manifest=manifest_path, accelerator="cpu")
    fr, yr_c, srcr = clf_data(REPORT_SEED, 32, 40, REPORT_SEED, 500, labels=LABELS)
    zr = features.standardize(fr, cmean, cstd)
    q = clf_quality(clf_m, zr, yr_c, srcr, REPORT_SEED)
    # in service: each machine commissioned, its per-device baseline's verdict gating the classifier
    q["fleet_gated"] = classifier_on_fleet(clf_m, Fleet(REPORT_SEED, 32), range(32), 40)["gated"]
    pi, pf = clf_m.predict_features(zr).argmax(1), f32_m.predict_features(zr).argmax(1)
    q["int8_float_agreement"] = round(float((pi == pf).mean()), 4)
    models["classifier"]["quality"] = q
    manifest_path.write_text(json.dumps(manifest) + "\n")
    print(json.dumps({k: v.get("quality") for k, v in models.items()}, indent=1))
    print(f"prefilter threshold {threshold:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
