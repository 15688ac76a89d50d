"""`sgw model train`: a model set retrained from labelled recordings (gateway/inference/training.py).

The end-to-end tests need the train extra (TensorFlow) and are skipped, saying so, where it is not
installed. Everything training does besides the Keras fit and the int8 conversion (the machine split,
the unknown rule's prototypes and threshold, the prefilter threshold, manifest entries and the
verification of the int8 files) is tested everywhere, on the committed LiteRT models.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.cli.main import main
from gateway.inference import features, load_model
from gateway.inference.dataset import load
from gateway.inference.decision import OpenSet
from gateway.inference.manifest import default_manifest_path, load_manifest
from gateway.inference.training import (
    MAX_MODEL_BYTES,
    Options,
    TrainError,
    calibrate_unknown,
    choose_threshold,
    open_set,
    preprocessing,
    split_machines,
    train,
    verify,
    write_model,
)

DATA = Path(__file__).parent / "data" / "fleet_small.npz"
HAVE_TF = importlib.util.find_spec("tensorflow") is not None
needs_tf = pytest.mark.skipif(not HAVE_TF, reason="the train extra (TensorFlow) is not installed here; "
                                                   "pip install 'sgw[train]' to run sgw model train")


def test_machines_are_split_not_windows() -> None:
    s = split_machines(np.array(["b", "a", "c", "a"]))
    assert (s.train, s.calibrate, s.report) == (("c",), ("b",), ("a",))
    s = split_machines(np.arange(10))
    assert s.report == ("0", "5") and s.calibrate == ("1", "6") and len(s.train) == 6
    assert not set(s.train) & set(s.calibrate + s.report)
    with pytest.raises(TrainError, match="at least 3 machines"):
        split_machines(np.array(["a", "b", "a"]))


def test_unknown_threshold_is_the_budget_quantile_of_calibration_known_faults() -> None:
    ds = load(DATA)
    z = features.extract_set(features.ORDER_SET, ds.windows)
    mean, std = z.mean(axis=0), z.std(axis=0) + 1e-6
    z = features.standardize(z, mean, std)
    labels = ["healthy", "bearing", "looseness"]
    y = np.array([labels.index(lab) if lab in labels else -1 for lab in ds.labels])
    tr, ca = ds.machine_ids == "2", ds.machine_ids == "1"
    oset = open_set(z[tr & (y >= 0)], y[tr & (y >= 0)], labels)
    assert oset["classes"] == ["bearing", "looseness"]
    known = z[ca & (y > 0)]
    oset["threshold"] = calibrate_unknown(oset, labels, known, 0.1)
    rule = OpenSet.from_manifest(oset, labels, z.shape[1])
    far = rule.distance(known) > rule.threshold
    assert 0 < far.sum() <= np.ceil(0.1 * len(known))
    # gear (never learned) sits further from the learned faults than they do
    gear = rule.distance(z[ca & (ds.labels == "gear")])
    assert np.median(gear) > np.median(rule.distance(known))
    with pytest.raises(TrainError, match="no windows of a learned fault"):
        calibrate_unknown(oset, labels, known[:0], 0.01)


def test_prefilter_threshold_keeps_the_healthy_budget() -> None:
    rng = np.random.default_rng(0)
    h, f = rng.normal(0, 1, 1000), rng.normal(6, 1, 1000)
    t = choose_threshold(np.r_[h, f], np.r_[np.ones(1000, bool), np.zeros(1000, bool)])
    assert (h > t).mean() <= 0.02 and (f > t).mean() >= 0.99
    # overlapping: the healthy budget wins over recall
    t = choose_threshold(np.r_[h, h + 1], np.r_[np.ones(1000, bool), np.zeros(1000, bool)])
    assert (h > t).mean() <= 0.02


def _committed_set(out: Path) -> Path:
    """The committed classifier's int8 files written as training writes them, into a fresh manifest."""
    spec = load_manifest().model("classifier")
    entry: dict[str, Any] = {"version": "t", "training_seed": 1, "labels": list(spec.labels),
                             "threshold": None,
                             "preprocessing": preprocessing(features.ORDER_SET, spec.preprocessing.mean,
                                                            spec.preprocessing.std),
                             "variants": [write_model(out, f"c_b{v.batch}.tflite", v.read_verified(), v.batch)
                                          for v in spec.variants]}
    (out / "manifest.json").write_text(json.dumps({"format": 1, "models": {"classifier": entry}}))
    return out / "manifest.json"


def test_verify_accepts_a_whole_set_and_refuses_a_changed_file(tmp_path: Path) -> None:
    manifest = _committed_set(tmp_path)
    ref = load_model("classifier", accelerator="cpu")
    f32 = load_model("classifier_f32", accelerator="cpu")
    z = ref.features(load(DATA).windows[::4])
    ok = verify(manifest, "classifier", z, f32.predict_features(z))
    assert ok["int8_float_agreement"] >= 0.9 and ok["bytes"] == [8032] * 4
    # a float model that disagrees everywhere: the conversion is refused, not shipped
    with pytest.raises(TrainError, match="agrees with the float model"):
        verify(manifest, "classifier", z, -f32.predict_features(z))
    # one changed byte: refused, naming the file
    blob = bytearray((tmp_path / "c_b8.tflite").read_bytes())
    blob[-5] ^= 1
    (tmp_path / "c_b8.tflite").write_bytes(bytes(blob))
    with pytest.raises(TrainError, match=r"c_b8\.tflite does not match its manifest"):
        verify(manifest, "classifier", z)


def test_a_file_over_the_size_limit_is_never_written(tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="over the 65536-byte limit"):
        write_model(tmp_path, "big.tflite", b"\0" * (MAX_MODEL_BYTES + 1), 1)
    assert not (tmp_path / "big.tflite").exists()


def test_train_without_tensorflow_is_one_line_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    if HAVE_TF:  # where the extra is installed, make its import fail as it does without it
        monkeypatch.setitem(sys.modules, "tensorflow", None)
    out = tmp_path / "set"
    assert main(["model", "train", "--data", str(DATA), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sgw: error:") and "sgw[train]" in err and "\n" not in err
    assert not out.exists()


def test_bad_options_are_refused_before_training(tmp_path: Path) -> None:
    ds = load(DATA)
    with pytest.raises(TrainError, match="--version"):
        train(ds, Options(out=tmp_path, version="../x"), fitter=lambda *a, **k: ({}, np.zeros(0)))
    with pytest.raises(TrainError, match="healthy cannot be held out"):
        train(ds, Options(out=tmp_path, hold_out=("healthy",)), fitter=lambda *a, **k: ({}, np.zeros(0)))
    assert not list(tmp_path.iterdir())


def _committed_fitter(*, flip: bool = False) -> Any:
    """A training.Fitter without TensorFlow: it hands back the committed int8 files (the classifier's 76
    and the prefilter's 48 inputs are the feature sets training uses) instead of fitting, with the
    committed float twin's outputs for the classifier (negated when flip, so verification must refuse)
    and, as no float prefilter ships, the int8 prefilter's own. Exercises everything train() does
    around the fit: thresholds, staging, verification, manifest, report."""
    spec = {n: load_manifest().model(n) for n in ("classifier", "prefilter")}
    f32 = load_model("classifier_f32", accelerator="cpu")
    pre = load_model("prefilter", accelerator="cpu")

    def fit(z: np.ndarray, _y: np.ndarray, _w: np.ndarray, *, n_out: int, batches: tuple[int, ...],
            **_kw: Any) -> tuple[dict[int, bytes], np.ndarray]:
        name = "prefilter" if n_out == 1 else "classifier"
        blobs = {v.batch: v.read_verified() for v in spec[name].variants if v.batch in batches}
        out = pre.predict_features(z) if n_out == 1 else f32.predict_features(z)
        return blobs, (-out if flip and n_out > 1 else out)
    return fit


def test_train_writes_the_set_through_verification_without_tensorflow(tmp_path: Path) -> None:
    out = tmp_path / "set"
    r = train(load(DATA), Options(out=out, hold_out=("gear",), commission=100), fitter=_committed_fitter())
    assert r["not_learned"] == ["gear"] and [c["name"] for c in r["verified"]] == ["classifier", "prefilter"]
    m = load_manifest(out / "manifest.json")
    assert set(m.models) == {"classifier", "prefilter"} and m.model("prefilter").threshold is not None
    files = ["manifest.json", "prefilter-user-1_b1.tflite",
             *(f"classifier-user-1_b{b}.tflite" for b in (1, 8, 32, 64))]
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    assert r["report_machines"]["in_service"]["machines"] == 1
    assert m.model("classifier").quality["report_machines"] == ["0"]


def test_a_set_that_fails_verification_changes_nothing(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    with pytest.raises(TrainError, match="agrees with the float model"):
        train(load(DATA), Options(out=fresh, hold_out=("gear",), commission=100),
              fitter=_committed_fitter(flip=True))
    assert not fresh.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "manifest.json").write_text('{"format": 1, "models": {}}\n')
    with pytest.raises(TrainError, match="agrees with the float model"):
        train(load(DATA), Options(out=kept, hold_out=("gear",), commission=100),
              fitter=_committed_fitter(flip=True))
    assert [p.name for p in kept.iterdir()] == ["manifest.json"]
    assert (kept / "manifest.json").read_text() == '{"format": 1, "models": {}}\n'


# --- end to end, where the train extra is installed ---------------------------------------------------
def _train(out: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, Any]:
    argv = ["model", "train", "--data", str(DATA), "--out", str(out), "--epochs", "5", "--hold-out", "gear",
            "--commission", "100", "--json", *extra]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


@needs_tf
def test_train_writes_a_verified_int8_set_that_evaluate_uses(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "set"
    r = _train(out, capsys)
    assert r["labels"] == ["healthy", "bearing", "imbalance", "looseness", "misalignment", "shift"]
    assert r["not_learned"] == ["gear"] and r["machines"] == {"train": ["2"], "calibrate": ["1"],
                                                              "report": ["0"]}
    assert [v["name"] for v in r["verified"]] == ["classifier", "prefilter"]
    m = load_manifest(out / "manifest.json")
    clf, pre = m.model("classifier"), m.model("prefilter")
    assert [v.batch for v in clf.variants] == [1, 8, 32, 64] and [v.batch for v in pre.variants] == [1]
    for v in (*clf.variants, *pre.variants):
        blob = v.read_verified()  # the manifest's sha256
        assert len(blob) <= MAX_MODEL_BYTES and v.input.dtype == "int8" and v.output.dtype == "int8"
    assert clf.open_set is not None and clf.open_set["calibration"]["machines"] == ["1"]
    assert pre.threshold is not None and clf.quality["report_machines"] == ["0"]
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["models"]["classifier"]["training_data"]["not_learned"] == ["gear"]
    assert not (out / "manifest.json.tmp").exists()
    # the new set is what `sgw model evaluate --manifest` judges
    assert main(["model", "evaluate", "--data", str(DATA), "--commission", "100", "--json",
                 "--manifest", str(out / "manifest.json")]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["classifier"]["labels"] == [*r["labels"], "unknown"]
    assert sum(sum(row.values()) for row in ev["classifier"]["confusion"].values()) == 552
    # the agent's prefilter loads from it too
    from gateway.inference import load_prefilter
    assert load_prefilter(manifest=out / "manifest.json").threshold == pre.threshold
    # an existing set is not replaced by accident
    before = (out / "manifest.json").read_bytes()
    assert main(["model", "train", "--data", str(DATA), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and (out / "manifest.json").read_bytes() == before


@needs_tf
def test_train_is_deterministic_and_keeps_other_models(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    b.mkdir()
    shutil.copy(default_manifest_path().parent / "classifier_f32_b64.tflite", b)
    shipped = json.loads(default_manifest_path().read_text())
    (b / "manifest.json").write_text(json.dumps(
        {"format": 1, "models": {"classifier_f32": shipped["models"]["classifier_f32"]}}))
    _train(a, capsys)
    _train(b, capsys, "--force")

    def digests(p: Path) -> dict[str, str]:
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in p.glob("*-user-1_b*.tflite")}
    assert digests(a) == digests(b) and len(digests(a)) == 5
    assert set(load_manifest(b / "manifest.json").models) == {"classifier", "prefilter", "classifier_f32"}
