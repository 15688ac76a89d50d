"""The LiteRT engine on the real committed models: integrity, backend policy, batching. No mocks."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gateway.errors import ModelError
from gateway.inference import backends, engine, load_model, load_prefilter, manifest
from gateway.sim import FAULTS, Generator

ROOT = Path(__file__).resolve().parent.parent
EDGE = ROOT / "edge_models"


@pytest.fixture
def models_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "edge_models"
    shutil.copytree(EDGE, dst, ignore=shutil.ignore_patterns("*.py", "*.md"))
    return dst / "manifest.json"


@pytest.fixture(scope="module")
def windows() -> tuple[np.ndarray, np.ndarray]:
    return Generator(4242).batch(130)


@pytest.fixture
def no_symbol_lib(tmp_path: Path) -> Path:
    """A real shared library that is not a TFLite delegate (no tflite_plugin_create_delegate)."""
    src = tmp_path / "fake.c"
    src.write_text("int not_a_delegate(void) { return 42; }\n")
    lib = tmp_path / "libfake_delegate.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    return lib


def test_default_manifest_is_the_checkout_copy() -> None:
    path = manifest.default_manifest_path()
    assert path == EDGE / "manifest.json"
    m = manifest.load_manifest()
    assert {"prefilter", "classifier"} <= set(m.models)
    assert [v.batch for v in m.model("classifier").variants] == [1, 8, 32, 64]


def test_default_manifest_prefers_the_wheel_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "_edge_models").mkdir()
    (tmp_path / "_edge_models" / "manifest.json").write_text("{}")
    monkeypatch.setattr(manifest.resources, "files", lambda _pkg: tmp_path)
    assert manifest.default_manifest_path() == tmp_path / "_edge_models" / "manifest.json"


def test_model_metadata() -> None:
    clf = load_model("classifier", accelerator="cpu")
    assert clf.labels == FAULTS and clf.name == "classifier" and clf.version
    assert clf.threshold is None
    assert clf.backend == "cpu" and "num_threads=1" in clf.backend_reason
    pre = load_model("prefilter", accelerator="cpu")
    assert pre.threshold is not None and pre.labels == ("anomaly",)


def test_tampered_model_is_refused(models_copy: Path) -> None:
    target = models_copy.parent / "classifier_b8.tflite"
    blob = bytearray(target.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    target.write_bytes(bytes(blob))
    with pytest.raises(ModelError, match=r"classifier_b8\.tflite does not match its manifest"):
        load_model("classifier", manifest=models_copy, accelerator="cpu")
    load_model("prefilter", manifest=models_copy, accelerator="cpu")  # untouched files still load


def test_missing_model_file_and_unknown_model(models_copy: Path) -> None:
    (models_copy.parent / "prefilter_b1.tflite").unlink()
    with pytest.raises(ModelError, match="cannot be read"):
        load_model("prefilter", manifest=models_copy, accelerator="cpu")
    with pytest.raises(ModelError, match="no model 'nope'"):
        load_model("nope", manifest=models_copy)


def test_malformed_manifest(models_copy: Path) -> None:
    models_copy.write_text(json.dumps({"models": {"x": {"version": "1"}}}))
    with pytest.raises(ModelError, match="malformed"):
        load_model("x", manifest=models_copy)
    models_copy.write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_model("x", manifest=models_copy)


def test_missing_delegate_is_an_error_under_delegate_policy(tmp_path: Path) -> None:
    lib = tmp_path / "libnothere.so"
    with pytest.raises(ModelError, match=r"delegate library .*libnothere\.so does not exist"):
        load_model("classifier", accelerator=f"delegate:{lib}")


def test_missing_delegate_falls_back_with_a_log_line_under_auto(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lib = str(tmp_path / "libnothere.so")
    with caplog.at_level(logging.INFO, logger="sgw.inference"):
        m = load_model("classifier", accelerator="auto", delegates=[lib])
    assert m.backend == "cpu"
    assert [a.backend for a in m.attempts] == ["npu", f"delegate:{lib}", "gpu", "cpu"]
    assert [a.ok for a in m.attempts] == [False, False, False, True]
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"backend=delegate:{lib} skipped" in s and "does not exist" in s for s in lines)
    assert any("backend=cpu selected (requested auto)" in s for s in lines)


def test_library_without_the_delegate_symbol_is_skipped_with_reason(no_symbol_lib: Path) -> None:
    m = load_model("classifier", accelerator="auto", delegates=[str(no_symbol_lib)])
    skipped = next(a for a in m.attempts if a.backend.startswith("delegate:"))
    assert not skipped.ok and "no tflite_plugin_create_delegate symbol" in skipped.reason
    with pytest.raises(ModelError, match="not a TFLite external delegate"):
        load_model("classifier", accelerator=f"delegate:{no_symbol_lib}")


@pytest.mark.skipif(bool(backends.npu_devices()), reason="this machine has an NPU device node")
def test_npu_policy_without_npu_fails_instead_of_running_on_cpu() -> None:
    with pytest.raises(ModelError, match="accelerator=npu") as info:
        load_model("classifier", accelerator="npu")
    assert "NPU" in str(info.value) or "npu" in str(info.value)


def test_bad_policy_and_threads() -> None:
    with pytest.raises(ModelError, match="is not one of"):
        load_model("classifier", accelerator="tpu")
    with pytest.raises(ModelError, match="is not one of"):
        load_model("classifier", accelerator="delegate:")
    with pytest.raises(ModelError, match="num_threads"):
        load_model("classifier", num_threads=0)


@pytest.mark.parametrize("n", [0, 1, 5, 8, 9, 33, 64, 65, 130])
def test_any_batch_size_gives_the_per_window_answer(n: int, windows: tuple[np.ndarray, np.ndarray]) -> None:
    m = load_model("classifier", accelerator="cpu")
    x = windows[0][:n]
    out = m.predict(x)
    assert out.shape == (n, len(FAULTS)) and out.dtype == np.float32
    one_by_one = np.concatenate([m.predict(x[i:i + 1]) for i in range(n)]) if n else out
    assert np.array_equal(out, one_by_one)  # same int8 scales in every fixed-batch variant
    if n:
        assert np.allclose(out.sum(axis=1), 1.0, atol=0.03)


def test_wrong_window_shape_is_refused() -> None:
    m = load_model("classifier", accelerator="cpu")
    with pytest.raises(ValueError, match="expects windows shaped"):
        m.predict(np.zeros((2, 64, 3), dtype=np.float32))


def test_compiled_model_path_agrees_with_the_interpreter(windows: tuple[np.ndarray, np.ndarray]) -> None:
    """NPU and GPU run through CompiledModel; exercise that path on the CPU accelerator here."""
    spec = manifest.load_manifest().model("classifier")
    blobs = {v.batch: v.read_verified() for v in spec.variants}
    runners = engine._compiled_runners(spec, blobs, backends.accelerator("cpu"), 1)
    compiled = engine.Model(spec, dict(runners), "cpu-compiled", [engine.Attempt("cpu", True, "test")], "cpu")
    ref = load_model("classifier", accelerator="cpu")
    assert np.array_equal(compiled.predict(windows[0][:70]), ref.predict(windows[0][:70]))


def test_prefilter_scores_and_gates(windows: tuple[np.ndarray, np.ndarray]) -> None:
    p = load_prefilter()
    x, y = windows
    scores = [p.score(w) for w in x[:40]]
    assert all(isinstance(s, float) for s in scores)
    assert [p.is_anomalous(s) for s in scores] == [s > p.threshold for s in scores]
    healthy = [s for s, label in zip(scores, y[:40], strict=True) if label == 0]
    faulty = [s for s, label in zip(scores, y[:40], strict=True) if label != 0]
    assert np.median(faulty) > p.threshold > np.median(healthy)


def test_prefilter_needs_a_threshold() -> None:
    with pytest.raises(ModelError, match="no threshold"):
        engine.Prefilter(load_model("classifier", accelerator="cpu"))
