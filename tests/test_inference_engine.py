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


# A minimal external delegate: TfLiteDelegate's C layout, a Prepare that claims no nodes (so LiteRT runs
# everything itself), and with -DREFUSE a create function that declines, as a delegate without its
# hardware does.
DELEGATE_C = r"""
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
typedef struct TfLiteDelegate {
  void* data_;
  int (*Prepare)(void* context, struct TfLiteDelegate* delegate);
  void* CopyFromBufferHandle;
  void* CopyToBufferHandle;
  void* FreeBufferHandle;
  int64_t flags;
  void* opaque_delegate_builder;
} TfLiteDelegate;
static int prepare(void* context, TfLiteDelegate* d) { (void)context; (void)d; return 0; }
TfLiteDelegate* tflite_plugin_create_delegate(char** k, char** v, size_t n, void (*err)(const char*)) {
  (void)k; (void)v; (void)n; (void)err;
#ifdef REFUSE
  return NULL;
#else
  TfLiteDelegate* d = calloc(1, sizeof(TfLiteDelegate));
  d->Prepare = prepare;
  return d;
#endif
}
void tflite_plugin_destroy_delegate(TfLiteDelegate* d) { free(d); }
"""


def _build(tmp_path: Path, name: str, source: str, *flags: str) -> Path:
    src = tmp_path / f"{name}.c"
    src.write_text(source)
    lib = tmp_path / f"lib{name}.so"
    subprocess.run(["gcc", "-shared", "-fPIC", *flags, "-o", str(lib), str(src)], check=True)
    return lib


@pytest.fixture
def noop_delegate(tmp_path: Path) -> Path:
    return _build(tmp_path, "noop_delegate", DELEGATE_C)


@pytest.fixture
def refusing_delegate(tmp_path: Path) -> Path:
    return _build(tmp_path, "refusing_delegate", DELEGATE_C, "-DREFUSE")


@pytest.fixture
def no_symbol_lib(tmp_path: Path) -> Path:
    """A real shared library that is not a TFLite delegate (no tflite_plugin_create_delegate)."""
    return _build(tmp_path, "fake_delegate", "int not_a_delegate(void) { return 42; }\n")


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
    # a closed label set: the learned classes, then "unknown" (the open-set rule, inference/decision.py)
    assert clf.labels == (*FAULTS, "unknown") and clf.name == "classifier" and clf.version
    assert clf.open_set is not None and clf.spec.labels == FAULTS
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


def test_a_working_delegate_is_chosen_and_computes_the_same(
        noop_delegate: Path, windows: tuple[np.ndarray, np.ndarray]) -> None:
    m = load_model("classifier", accelerator="auto", delegates=[str(noop_delegate)],
                   delegate_options={"unused": "1"})
    assert m.backend == f"delegate:{noop_delegate}" and m.attempts[-1].ok
    ref = load_model("classifier", accelerator="cpu")
    assert np.array_equal(m.predict(windows[0][:20]), ref.predict(windows[0][:20]))


def test_a_refusing_delegate_is_skipped_under_auto_and_fatal_when_required(refusing_delegate: Path) -> None:
    m = load_model("classifier", accelerator="auto", delegates=[str(refusing_delegate)])
    attempt = m.attempts[1]
    assert m.backend == "cpu" and not attempt.ok and "refused: Failed to load delegate" in attempt.reason
    with pytest.raises(ModelError, match="refused"):
        load_model("classifier", accelerator=f"delegate:{refusing_delegate}")


@pytest.mark.skipif(bool(backends.npu_devices()), reason="this machine has an NPU device node")
def test_npu_policy_without_npu_fails_instead_of_running_on_cpu() -> None:
    with pytest.raises(ModelError, match="accelerator=npu") as info:
        load_model("classifier", accelerator="npu")
    assert "NPU" in str(info.value) or "npu" in str(info.value)


def test_an_npu_device_node_alone_does_not_make_an_npu_backend(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a dispatch library and a device node but no real NPU, NPU|CPU compiles and silently runs on
    the CPU; the engine must notice (not fully accelerated) and refuse to call that an NPU."""
    if backends.find_dispatch_library() is None:
        pytest.skip("this ai_edge_litert ships no NPU dispatch library")
    (tmp_path / "accel0").touch()
    monkeypatch.setattr(backends, "NPU_DEVICE_GLOBS", (str(tmp_path / "accel*"),))
    with pytest.raises(ModelError, match="kept ops on the CPU"):
        load_model("classifier", accelerator="npu")
    assert load_model("classifier", accelerator="auto").backend == "cpu"


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
    assert out.shape == (n, len(FAULTS) + 1) and out.dtype == np.float32  # probabilities, unknown score
    one_by_one = np.concatenate([m.predict(x[i:i + 1]) for i in range(n)]) if n else out
    assert np.array_equal(out, one_by_one)  # same int8 scales in every fixed-batch variant
    if n:
        assert np.allclose(out[:, :len(FAULTS)].sum(axis=1), 1.0, atol=0.03)
        assert (out[:, -1] >= 0).all()


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


def test_variants_with_different_int8_parameters_are_refused(models_copy: Path) -> None:
    raw = json.loads(models_copy.read_text())
    raw["models"]["classifier"]["variants"][2]["input"]["scale"] *= 2
    models_copy.write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="other tensor parameters"):
        load_model("classifier", manifest=models_copy, accelerator="cpu")
