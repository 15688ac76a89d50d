"""`sgw model train --data FILE`: the model set retrained from a user's labelled recordings.

Everything here except the Keras fit and int8 conversion (gateway/inference/keras_models.py, the
optional `train` extra) is numpy and LiteRT, so it runs and is tested in any sgw install.

Machines, not windows, are split (the same rule as every figure in edge_models/README.md: nothing is
judged on a machine that anything was fitted or chosen on). In sorted machine-id order, every 5th
machine from the first is a **report** machine (figures only), every 5th from the second a
**calibration** machine (thresholds only), the rest **train** (at least 3 machines in all).

- classifier: labels are `healthy` first, then every other label present on train machines (sorted);
  a label only on other machines is a fault type it never learned, reported as such. Features
  `vib-v1+ord1`, standardized with the train machines' mean and deviation; a 2-hidden-layer MLP,
  each class weighing the same. Its `unknown` rule (gateway/inference/decision.py): per learned fault
  class, the mean and shrunk covariance of its train windows; the threshold is the distance that
  `unknown_budget` (default 1 %) of the calibration machines' known-fault windows exceed.
- prefilter: the agent's global int8 gate (`vib-v1`, healthy versus any fault), its threshold chosen
  on the calibration machines (a healthy budget and a fault recall target, as edge_models/train.py).

The int8 files are then **verified** before the manifest names them: each loads from its verified
bytes through the runtime's own engine, every batch variant answers the same windows identically, the
int8 answers agree with the float model's, and no file exceeds 64 KB (MAX_MODEL_BYTES).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.errors import LocalError
from gateway.inference import features
from gateway.inference.dataset import Dataset
from gateway.inference.decision import HEALTHY

CLF_FEATURES = features.ORDER_SET
PRE_FEATURES = features.FEATURE_SET
CLASSIFIER_BATCHES = (1, 8, 32, 64)
PREFILTER_BATCHES = (1,)
MAX_MODEL_BYTES = 64 * 1024  # issue 13: each model at most 64 KB
SHRINK = 0.1  # toward the diagonal: a class covariance from few windows of 76 features
TARGET_HEALTHY_FORWARD = 0.02
TARGET_FAULT_RECALL = 0.995
MIN_AGREEMENT = 0.9  # int8 against float answers on the train windows; below it the conversion failed
F32 = npt.NDArray[np.float32]
VERSION_RE = re.compile(r"[A-Za-z0-9._-]{1,40}")  # it names the model files


class TrainError(LocalError):
    """Data that cannot train a model set, or a model that failed verification; one line says why."""


# --- the split ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Split:
    train: tuple[str, ...]
    calibrate: tuple[str, ...]
    report: tuple[str, ...]

    def mask(self, machine_ids: npt.NDArray[np.str_], part: str) -> npt.NDArray[np.bool_]:
        return np.isin(machine_ids, list(getattr(self, part)))


def split_machines(machine_ids: npt.ArrayLike) -> Split:
    ms = sorted(set(np.asarray(machine_ids).astype(str).tolist()))
    if len(ms) < 3:
        raise TrainError(f"need windows of at least 3 machines (train, calibration, report), got {len(ms)}")
    report, calibrate = tuple(ms[0::5]), tuple(ms[1::5])
    return Split(tuple(m for m in ms if m not in report and m not in calibrate), calibrate, report)


# --- the classifier's open-set rule -------------------------------------------------------------------
def open_set(z: npt.ArrayLike, y: npt.ArrayLike, labels: Sequence[str]) -> dict[str, Any]:
    """Per learned fault class (every label but healthy) mean and whitener of its standardized features;
    the threshold is set by calibrate_unknown. z (n, features), y indexes labels."""
    za, ya = np.asarray(z), np.asarray(y)  # means in the features' own dtype, as the shipped set was fitted
    classes = [lab for lab in labels if lab != HEALTHY]
    cents, whites = [], []
    for lab in classes:
        zk = za[ya == labels.index(lab)]
        if len(zk) < 2:
            raise TrainError(f"label {lab!r} has {len(zk)} train window(s); each needs at least 2")
        cov = np.cov(zk.T)
        cov = (1 - SHRINK) * cov + SHRINK * np.diag(np.diag(cov)) + 1e-6 * np.eye(len(cov))
        whites.append(np.linalg.cholesky(np.linalg.inv(cov)).T)
        cents.append(zk.mean(axis=0))

    def r(a: Any) -> Any:
        return np.round(np.asarray(a, dtype=np.float64), 5).tolist()
    return {"rule": "min over fault classes of Mahalanobis distance / sqrt(features) > threshold",
            "classes": classes, "centroids": r(cents), "whiteners": r(whites), "threshold": 1.0}


def calibrate_unknown(oset: Mapping[str, Any], labels: Sequence[str], z_known_faults: npt.ArrayLike,
                      budget: float) -> float:
    """The distance exceeded by `budget` of known-fault windows of machines the classes were not fitted
    on: those windows would be called unknown at that rate."""
    from gateway.inference.decision import OpenSet  # noqa: PLC0415 - keeps the import list short

    z = np.asarray(z_known_faults, dtype=np.float32)
    if not len(z):
        raise TrainError("the calibration machines have no windows of a learned fault label")
    if not 0.0 < budget < 0.5:
        raise TrainError(f"unknown budget {budget} must be in (0, 0.5)")
    d = OpenSet.from_manifest(oset, labels, z.shape[1]).distance(z)
    return float(np.quantile(d, 1.0 - budget))


def choose_threshold(scores: npt.ArrayLike, healthy: npt.ArrayLike) -> float:
    """A gate's threshold from scores on calibration data (forwarded when above it).

    t_budget is the lowest threshold that forwards at most TARGET_HEALTHY_FORWARD of healthy windows,
    t_recall the highest that still forwards TARGET_FAULT_RECALL of faulty ones. When both hold, the
    midpoint leaves margin on either side for data the calibration set did not show; when they conflict
    the healthy budget wins, because an agent that forwards everything saves nothing.
    """
    s, hm = np.asarray(scores, dtype=np.float64), np.asarray(healthy, dtype=bool)
    h, f = np.sort(s[hm]), np.sort(s[~hm])
    if not len(h) or not len(f):
        raise TrainError("choosing a threshold needs healthy and faulty calibration windows")
    t_budget = float(h[min(int(np.floor(len(h) * (1.0 - TARGET_HEALTHY_FORWARD))), len(h) - 1)])
    t_recall = float(np.nextafter(f[int(np.floor(len(f) * (1.0 - TARGET_FAULT_RECALL)))], -np.inf))
    return (t_budget + t_recall) / 2.0 if t_budget <= t_recall else t_budget


# --- model files and manifest entries -----------------------------------------------------------------
def describe(blob: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """Input and output tensor specs of a LiteRT flatbuffer, as the manifest records them."""
    from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415 - LiteRT is heavy to import

    it = Interpreter(model_content=blob)

    def one(d: Mapping[str, Any]) -> dict[str, Any]:
        scale, zp = d["quantization"]
        return {"shape": [int(s) for s in d["shape"]], "dtype": np.dtype(d["dtype"]).name,
                "scale": float(scale), "zero_point": int(zp)}
    return one(it.get_input_details()[0]), one(it.get_output_details()[0])


def write_model(out: Path, name: str, blob: bytes, batch: int) -> dict[str, Any]:
    """Write one model file; its manifest variant (file, sha256, bytes, tensors)."""
    if len(blob) > MAX_MODEL_BYTES:
        raise TrainError(f"{name}: {len(blob)} bytes, over the {MAX_MODEL_BYTES}-byte limit")
    inp, outp = describe(blob)
    (out / name).write_bytes(blob)
    return {"batch": batch, "file": name, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob),
            "input": inp, "output": outp}


def preprocessing(name: str, mean: npt.ArrayLike, std: npt.ArrayLike) -> dict[str, Any]:
    return {"features": name, "sample_rate_hz": 1600.0, "window": 128, "bands_hz": list(features.BANDS_HZ),
            "mean": [float(v) for v in np.asarray(mean)], "std": [float(v) for v in np.asarray(std)]}


def verify(manifest_path: Path, name: str, z: F32, float_out: F32 | None = None) -> dict[str, Any]:
    """Load `name` through the runtime's engine (sha256-checked bytes) and check it: every batch
    variant gives the same answers on z (standardized features), files within MAX_MODEL_BYTES, and
    int8 argmax (or, for one output, the sign against the threshold) agreeing with the float model's
    float_out on at least MIN_AGREEMENT of z. TrainError names the model and what failed."""
    from gateway.errors import ModelError  # noqa: PLC0415
    from gateway.inference.engine import load_model  # noqa: PLC0415

    try:
        m = load_model(name, manifest=manifest_path, accelerator="cpu")
    except ModelError as exc:
        raise TrainError(f"verification: {exc}") from None
    big = [v.path.name for v in m.spec.variants if v.path.stat().st_size > MAX_MODEL_BYTES]
    if big:
        raise TrainError(f"verification: {name}: {', '.join(big)} over {MAX_MODEL_BYTES} bytes")
    whole = m.predict_features(z)
    for b in (v.batch for v in m.spec.variants):
        part = np.concatenate([m.predict_features(z[i:i + b]) for i in range(0, len(z), b)])
        if not np.array_equal(part, whole):
            raise TrainError(f"verification: {name}: the batch-{b} file answers differently")
    out: dict[str, Any] = {"name": name, "windows": len(z), "bytes": [v.path.stat().st_size
                                                                      for v in m.spec.variants]}
    if float_out is not None:
        if whole.shape[1] == 1:
            t = m.threshold or 0.0
            agree = float(((whole[:, 0] > t) == (float_out[:, 0] > t)).mean())
        else:
            agree = float((whole.argmax(axis=1) == float_out.argmax(axis=1)).mean())
        if agree < MIN_AGREEMENT:
            raise TrainError(f"verification: {name}: int8 agrees with the float model on {agree:.1%} of "
                             f"windows, under {MIN_AGREEMENT:.0%}")
        out["int8_float_agreement"] = round(agree, 4)
    return out


# --- the whole run ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    out: Path
    epochs: int = 60
    seed: int = 1
    unknown_budget: float = 0.01
    version: str = "user-1"
    data_name: str = ""
    hold_out: tuple[str, ...] = ()  # labels never trained on (to see how an unseen fault is answered)
    commission: int = 300  # healthy windows per report machine its baseline learns from (as evaluate)


# (features z, integer targets, class weights per row, outputs, hidden, layers, activation, loss,
#  batches, seed) -> (int8 blobs per batch, float outputs on z)
Fitter = Callable[..., tuple[dict[int, bytes], F32]]


def train(ds: Dataset, opts: Options, fitter: Fitter | None = None,
          progress: Callable[[str], None] = lambda _s: None) -> dict[str, Any]:
    """Train, convert, verify and write the classifier and prefilter of a model set into opts.out
    (manifest.json beside the files; entries of other models already there are kept). Returns the
    summary the CLI prints."""
    if fitter is None:
        from gateway.inference.keras_models import fit_mlp  # noqa: PLC0415 - the optional extra
        fitter = fit_mlp
    if opts.epochs < 1:
        raise TrainError("--epochs must be at least 1")
    if not VERSION_RE.fullmatch(opts.version):
        raise TrainError(f"--version {opts.version!r}: 1-40 of A-Z a-z 0-9 . _ -")
    split = split_machines(ds.machine_ids)
    tr, ca, rp = (split.mask(ds.machine_ids, p) for p in ("train", "calibrate", "report"))
    if HEALTHY in opts.hold_out:
        raise TrainError("healthy cannot be held out")
    tr = tr & ~np.isin(ds.labels, list(opts.hold_out))  # from here on: the windows that are fitted on
    present = sorted(set(ds.labels[tr].tolist()))
    if HEALTHY not in present or len(present) < 2:
        raise TrainError(f"the train machines ({', '.join(split.train)}) need healthy windows and at least "
                         f"one fault label, they have {', '.join(present) or 'none'}")
    labels = [HEALTHY, *(lab for lab in present if lab != HEALTHY)]
    progress(f"features of {len(ds.labels)} windows")
    f_clf = features.extract_set(CLF_FEATURES, ds.windows)
    f_pre = features.extract_set(PRE_FEATURES, ds.windows)

    # classifier
    cmean, cstd = f_clf[tr].mean(axis=0), f_clf[tr].std(axis=0) + 1e-6
    zc = features.standardize(f_clf, cmean, cstd)
    index = {lab: k for k, lab in enumerate(labels)}
    known = np.array([lab in index for lab in ds.labels])
    y = np.array([index.get(lab, -1) for lab in ds.labels])
    counts = np.bincount(y[tr], minlength=len(labels))
    weights = (tr.sum() / (len(labels) * counts))[y[tr]].astype(np.float32)
    progress(f"classifier: {len(labels)} labels, {int(tr.sum())} windows of {len(split.train)} machines")
    c_blobs, c_float = fitter(zc[tr], y[tr], weights, n_out=len(labels), hidden=32, layers=2,
                              activation="softmax", loss="sparse_categorical_crossentropy",
                              batches=CLASSIFIER_BATCHES, seed=opts.seed, epochs=opts.epochs)
    oset = open_set(zc[tr], y[tr], labels)
    oset["threshold"] = calibrate_unknown(oset, labels, zc[ca & known & (y > 0)], opts.unknown_budget)
    oset.update(budget=opts.unknown_budget, calibration={"machines": list(split.calibrate),
                                                         "known_faults_only": True})

    # prefilter
    pmean, pstd = f_pre[tr].mean(axis=0), f_pre[tr].std(axis=0) + 1e-6
    zp = features.standardize(f_pre, pmean, pstd)
    healthy = ds.labels == HEALTHY
    pw = np.where(healthy[tr], 0.5 / healthy[tr].mean(), 0.5 / (1 - healthy[tr].mean())).astype(np.float32)
    progress("prefilter: healthy versus every fault")
    p_blobs, p_float = fitter(zp[tr], (~healthy[tr]).astype(np.float32), pw, n_out=1, hidden=12, layers=1,
                              activation=None, loss="binary_logit", batches=PREFILTER_BATCHES,
                              seed=opts.seed, epochs=opts.epochs)

    out = opts.out
    manifest_path = out / "manifest.json"
    manifest: dict[str, Any] = {"format": 1, "models": {}}
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
            manifest["models"] = dict(manifest["models"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TrainError(f"{manifest_path}: cannot add to it: {exc}") from None
    split_doc = {"train": list(split.train), "calibrate": list(split.calibrate), "report": list(split.report)}
    data_doc = {"file": opts.data_name, "windows": len(ds.labels), "machines": split_doc,
                "labels": {lab: int((ds.labels == lab).sum()) for lab in sorted(set(ds.labels.tolist()))},
                "not_learned": sorted(set(ds.labels.tolist()) - set(labels))}
    base = {"version": opts.version, "training_seed": opts.seed, "trained_by": "sgw model train",
            "training_data": data_doc}
    # Everything is written and verified in a staging folder first and moved into `out` only once it
    # all passed: a failed run leaves `out` (and a manifest already there) exactly as it was.
    created = not out.exists()
    stage_dir = out / f".staging-{opts.version}"
    try:
        stage_dir.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        raise TrainError(f"{stage_dir} exists: another training run, or a killed one (remove it)") from None
    except OSError as exc:
        raise TrainError(f"{out}: cannot write: {exc.strerror or exc}") from None
    try:
        checks, quality, models = _write_and_verify(
            stage_dir, manifest, base, tag=f"-{opts.version}", labels=labels, oset=oset,
            blobs=(c_blobs, p_blobs), constants=(cmean, cstd, pmean, pstd), floats=(c_float, p_float),
            z=(zc, zp), masks=(tr, ca, rp), ds=ds, commission=opts.commission, progress=progress)
        models["classifier"]["quality"] = {"report_machines": list(split.report),
                                           **quality.get("in_service", {}).get("classifier", {})}
        models["prefilter"]["quality"] = {"report_machines": list(split.report),
                                          "forwarded": quality.get("prefilter_forwarded", {})}
        for m in models.values():
            for v in m["variants"]:
                (stage_dir / v["file"]).replace(out / v["file"])
        final = out / "manifest.json.tmp"
        final.write_text(json.dumps({**manifest, "models": {**manifest["models"], **models}}) + "\n")
        final.replace(manifest_path)  # the manifest names the files only once all of them are verified
    finally:
        shutil.rmtree(stage_dir, ignore_errors=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
    return {"out": str(out), "manifest": str(manifest_path), "labels": labels, "machines": split_doc,
            "not_learned": data_doc["not_learned"], "verified": checks, "report_machines": quality}


def _write_and_verify(stage: Path, manifest: dict[str, Any], base: dict[str, Any], *, tag: str,
                      labels: list[str], oset: dict[str, Any],
                      blobs: tuple[dict[int, bytes], dict[int, bytes]],
                      constants: tuple[F32, ...], floats: tuple[F32, F32], z: tuple[F32, F32],
                      masks: tuple[npt.NDArray[np.bool_], ...], ds: Dataset, commission: int,
                      progress: Callable[[str], None]) -> tuple[list[dict[str, Any]], dict[str, Any],
                                                               dict[str, Any]]:
    """Model files and a manifest in `stage`; the prefilter's threshold from its int8 file; verification
    and the report machines' figures. Returns (checks, quality, the new manifest entries)."""
    from gateway.inference.engine import load_model  # noqa: PLC0415

    cmean, cstd, pmean, pstd = constants
    zc, zp = z
    tr, ca, rp = masks
    models: dict[str, Any] = {
        "classifier": {**base, "preprocessing": preprocessing(CLF_FEATURES, cmean, cstd), "labels": labels,
                       "threshold": None, "output": "probabilities", "open_set": oset,
                       "variants": [write_model(stage, f"classifier{tag}_b{b}.tflite", blobs[0][b], b)
                                    for b in CLASSIFIER_BATCHES]},
        "prefilter": {**base, "preprocessing": preprocessing(PRE_FEATURES, pmean, pstd),
                      "labels": ["anomaly"], "threshold": 0.0, "output": "logit",
                      "variants": [write_model(stage, f"prefilter{tag}_b{b}.tflite", blobs[1][b], b)
                                   for b in PREFILTER_BATCHES]},
    }
    staged = stage / "manifest.json"

    def write() -> None:
        staged.write_text(json.dumps({**manifest, "models": {**manifest["models"], **models}}) + "\n")

    write()
    # the prefilter's threshold, from the int8 file that ships, on the calibration machines
    pre = load_model("prefilter", manifest=staged, accelerator="cpu")
    healthy = ds.labels == HEALTHY
    step = float(pre.output_scale)
    t_pre = choose_threshold(pre.predict_features(zp[ca])[:, 0], healthy[ca])
    # int8 scores sit on multiples of the output scale; halfway between two cannot flip with rounding
    models["prefilter"]["threshold"] = float((np.floor(t_pre / step) + 0.5) * step)
    write()
    progress("verifying the int8 files")
    checks = [verify(staged, "classifier", zc[tr], floats[0]), verify(staged, "prefilter", zp[tr], floats[1])]
    quality = report_figures(staged, ds, zp, mask=rp, commission=commission) if rp.any() else {}
    return checks, quality, models


def report_figures(manifest_path: Path, ds: Dataset, zp: F32, *, mask: npt.NDArray[np.bool_],
                   commission: int) -> dict[str, Any]:
    """Figures on the report machines only (nothing was fitted or chosen on them): the new classifier as in
    service (gateway/inference/evaluation.py: each machine commissioned, its baseline gating the
    classifier), and the forward rates of the new global prefilter (an agent that does not commission)."""
    from gateway.inference import evaluation  # noqa: PLC0415
    from gateway.inference.engine import load_model  # noqa: PLC0415

    sub = Dataset(ds.windows[mask], ds.labels[mask], ds.machine_ids[mask])
    pre = load_model("prefilter", manifest=manifest_path, accelerator="cpu")
    t = sub.labels
    fwd = pre.predict_features(zp[mask])[:, 0] > (pre.threshold or 0.0)
    return {"in_service": evaluation.report(sub, commission=commission, target=0.01, manifest=manifest_path),
            "prefilter_forwarded": {lab: round(float(fwd[t == lab].mean()), 4)
                                    for lab in sorted(set(t.tolist()))}}
