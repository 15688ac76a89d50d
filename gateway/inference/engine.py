"""Load a manifest model onto the best allowed backend and run it on raw windows.

Accelerator policies (gateway.toml [inference] accelerator):
  auto            NPU (only if one is really there, see backends.py), then each configured external
                  delegate, then GPU (its own attempt: GPU|CPU raises instead of falling back), then the
                  CPU Interpreter. Every skipped step is logged with its reason and kept in `attempts`.
  npu | gpu       that accelerator or a ModelError; never a silent CPU run.
  delegate:/x.so  that external delegate or a ModelError.
  cpu             the CPU Interpreter.

A Model is not thread-safe (LiteRT interpreters are not): use one per thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.errors import ModelError
from gateway.inference import backends, decision, features
from gateway.inference.manifest import ModelSpec, Variant, load_manifest

log = logging.getLogger("sgw.inference")

F32 = npt.NDArray[np.float32]
_LOAD_ERRORS = (OSError, AttributeError, ValueError, RuntimeError)


@dataclass(frozen=True)
class Attempt:
    backend: str
    ok: bool
    reason: str


class _SkipError(Exception):
    """This backend cannot serve; the message says why."""


Runners = dict[int, backends.Runner]
Step = tuple[str, Callable[[], tuple[Runners, str]]]


def _params(v: Variant) -> tuple[object, ...]:
    return (v.input.scale, v.input.zero_point, v.output.scale, v.output.zero_point, v.input.shape[1:],
            v.output.shape[1:], v.input.dtype, v.output.dtype)


class Model:
    def __init__(self, spec: ModelSpec, runners: Runners, backend: str, attempts: Sequence[Attempt],
                 requested: str) -> None:
        self.spec = spec
        self.name = spec.name
        self.version = spec.version
        # a classifier with an open-set rule answers in a closed set: its classes plus "unknown"
        self.labels = spec.labels + ((decision.UNKNOWN,) if spec.open_set is not None else ())
        self.threshold = spec.threshold
        self.backend = backend
        self.requested = requested
        self.attempts = list(attempts)
        self.backend_reason = self.attempts[-1].reason
        self._runners = runners
        self._batches = sorted(runners)
        v = spec.variants[0]
        for w in spec.variants:
            # one set of int8 parameters serves every batch size; variants calibrated apart would not agree
            if _params(w) != _params(v):
                raise ModelError(f"{spec.name}: {w.path.name} has other tensor parameters than {v.path.name}")
        try:
            n_feat = features.n_features_of(spec.preprocessing.features, spec.preprocessing.bands_hz)
        except ValueError as exc:
            raise ModelError(f"{spec.name}: {exc}") from None
        if v.input.shape[-1] != n_feat:
            raise ModelError(f"{spec.name}: model takes {v.input.shape[-1]} inputs, features give {n_feat}")
        self._in_q = v.input.dtype == "int8"
        self._out_q = v.output.dtype == "int8"
        self._in_scale, self._in_zp = v.input.scale, v.input.zero_point
        self.output_scale, self._out_zp = v.output.scale, v.output.zero_point
        self.n_outputs = v.output.shape[-1]
        self.open_set: decision.OpenSet | None = None
        if spec.open_set is not None:
            try:
                self.open_set = decision.OpenSet.from_manifest(spec.open_set, spec.labels, n_feat)
            except (KeyError, TypeError, ValueError) as exc:
                raise ModelError(f"{spec.name}: open_set in the manifest is malformed: {exc}") from None
        p = spec.preprocessing
        self.window_shape = (p.window, 3)
        self._mean = np.asarray(p.mean, dtype=np.float32)
        self._std = np.asarray(p.std, dtype=np.float32)

    def features(self, x: npt.ArrayLike) -> F32:
        """Standardized features of windows (n, window, 3), exactly as in training."""
        a = np.asarray(x, dtype=np.float32)
        if a.ndim == 2:
            a = a[None]
        if a.shape[1:] != self.window_shape:
            raise ValueError(f"{self.name} expects windows shaped {self.window_shape}, got {a.shape[1:]}")
        p = self.spec.preprocessing
        f = features.extract_set(p.features, a, p.sample_rate_hz, p.bands_hz)
        return features.standardize(f, self._mean, self._std)

    def quantize(self, z: F32) -> npt.NDArray[Any]:
        if not self._in_q:
            return z
        q = np.clip(np.rint(z / self._in_scale) + self._in_zp, -128, 127)
        return np.asarray(q, dtype=np.int8)

    def predict(self, x: npt.ArrayLike) -> F32:
        """Scores float32 (n, len(labels)) for windows float32 (n, window, 3), any n (padded to fixed
        batches). With an open-set rule the last column is the "unknown" score (decision.py)."""
        return self.score_features(self.features(x))

    def score_features(self, z: F32) -> F32:
        """predict() from standardized features: the model's outputs, plus the unknown score if any."""
        out = self.predict_features(z)
        if self.open_set is None:
            return out
        return np.concatenate([out, self.open_set.unknown_score(z)[:, None]], axis=1)

    def predict_features(self, z: F32) -> F32:
        n = len(z)
        out = np.empty((n, self.n_outputs), dtype=np.float32)
        q = self.quantize(z)
        i = 0
        while i < n:
            rem = n - i
            # one padded invoke beats several small ones: per-invoke overhead dominates at this size
            b = next((b for b in self._batches if b >= rem), self._batches[-1])
            take = min(b, rem)
            chunk = q[i:i + take]
            if take < b:
                chunk = np.concatenate([chunk, np.zeros((b - take, *chunk.shape[1:]), dtype=chunk.dtype)])
            raw = self._runners[b].run(chunk)[:take]
            out[i:i + take] = ((raw.astype(np.float32) - self._out_zp) * self.output_scale
                               if self._out_q else raw)
            i += take
        return out


class Prefilter:
    """The agent's per-window gate: score one window, compare with the manifest's threshold."""

    def __init__(self, model: Model) -> None:
        if model.threshold is None:
            raise ModelError(f"model {model.name!r} has no threshold in its manifest: it cannot gate")
        if model.n_outputs != 1:
            raise ModelError(f"model {model.name!r} has {model.n_outputs} outputs; a prefilter has one")
        self.model = model
        self.threshold = model.threshold

    def score(self, window: npt.ArrayLike) -> float:
        return float(self.model.predict(window)[0, 0])

    def is_anomalous(self, score: float) -> bool:
        return score > self.threshold


def load_prefilter(*, manifest: Path | None = None, accelerator: str = "cpu",
                   num_threads: int = 1) -> Prefilter:
    model = load_model("prefilter", manifest=manifest, accelerator=accelerator, num_threads=num_threads)
    return Prefilter(model)


def _interpreter_runners(spec: ModelSpec, blobs: Mapping[int, bytes], num_threads: int,
                         delegates: Sequence[Any] = ()) -> Runners:
    return {v.batch: backends.InterpreterRunner(blobs[v.batch], v.batch, num_threads, delegates)
            for v in spec.variants}


def _compiled_runners(spec: ModelSpec, blobs: Mapping[int, bytes], acc: Any, num_threads: int,
                      env: Any = None) -> dict[int, backends.CompiledRunner]:
    def one(v: Variant) -> backends.CompiledRunner:
        return backends.CompiledRunner(blobs[v.batch], v.batch, v.output.shape,
                                       np.dtype(v.output.dtype), accelerators=acc,
                                       num_threads=num_threads, environment=env)
    return {v.batch: one(v) for v in spec.variants}


def _try_npu(spec: ModelSpec, blobs: Mapping[int, bytes], num_threads: int,
             dispatch: str | None) -> tuple[Runners, str]:
    lib = backends.find_dispatch_library(dispatch)
    if lib is None:
        raise _SkipError("no LiteRT NPU dispatch library (libLiteRtDispatch_*.so) found")
    devices = backends.npu_devices()
    if not devices:
        nodes = ", ".join(backends.NPU_DEVICE_GLOBS)
        raise _SkipError(f"dispatch library in {lib} but no NPU device node ({nodes})")
    try:
        runners = _compiled_runners(spec, blobs, backends.accelerator("npu"), num_threads,
                                    backends.npu_environment(lib))
    except _LOAD_ERRORS as exc:
        raise _SkipError(f"NPU compile failed on {devices[0]}: {exc}") from exc
    if not all(r.fully_accelerated for r in runners.values()):
        raise _SkipError(f"{devices[0]} present but LiteRT kept ops on the CPU (not fully accelerated)")
    return dict(runners), f"{devices[0]} via {lib}, fully accelerated"


def _try_gpu(spec: ModelSpec, blobs: Mapping[int, bytes], num_threads: int) -> tuple[Runners, str]:
    try:
        runners = _compiled_runners(spec, blobs, backends.accelerator("gpu"), num_threads)
    except _LOAD_ERRORS as exc:
        # LiteRT's exception text is only a source location; the cause (e.g. "WebGPU: no adapters")
        # goes to its own stderr log
        raise _SkipError(f"GPU unavailable: CompiledModel(GPU) raised {type(exc).__name__}, "
                         "see LiteRT's stderr for the cause") from exc
    return dict(runners), "GPU accelerator compiled the model"


def _try_delegate(spec: ModelSpec, blobs: Mapping[int, bytes], num_threads: int, path: str,
                  options: Mapping[str, str] | None) -> tuple[Runners, str]:
    why = backends.check_delegate_library(path)
    if why:
        raise _SkipError(why)
    try:
        d = backends.load_delegate(path, options)
        return _interpreter_runners(spec, blobs, num_threads, [d]), f"external delegate {path}"
    except _LOAD_ERRORS as exc:
        raise _SkipError(f"delegate {path} refused: {str(exc).strip()}") from exc


def _try_cpu(spec: ModelSpec, blobs: Mapping[int, bytes], num_threads: int) -> tuple[Runners, str]:
    return _interpreter_runners(spec, blobs, num_threads), f"CPU Interpreter, num_threads={num_threads}"


def load_model(name: str, *, manifest: Path | None = None, accelerator: str = "auto",
               delegates: Sequence[str] = (), num_threads: int = 1,
               delegate_options: Mapping[str, str] | None = None,
               npu_dispatch_dir: str | None = None) -> Model:
    """Verify `name`'s files against the manifest, then bind them to the first backend the policy allows."""
    if num_threads < 1:
        raise ModelError(f"num_threads must be >= 1, got {num_threads}")
    spec = load_manifest(manifest).model(name)
    blobs = {v.batch: v.read_verified() for v in spec.variants}  # refuse tampering before any backend runs
    npu: Step = ("npu", lambda: _try_npu(spec, blobs, num_threads, npu_dispatch_dir))
    gpu: Step = ("gpu", lambda: _try_gpu(spec, blobs, num_threads))
    cpu: Step = ("cpu", lambda: _try_cpu(spec, blobs, num_threads))

    def delegate(p: str) -> Step:
        return (f"delegate:{p}", lambda: _try_delegate(spec, blobs, num_threads, p, delegate_options))

    if accelerator == "auto":
        steps = [npu, *(delegate(p) for p in delegates), gpu, cpu]
    elif accelerator in ("npu", "gpu", "cpu"):
        steps = [{"npu": npu, "gpu": gpu, "cpu": cpu}[accelerator]]
    elif accelerator.startswith("delegate:") and accelerator[len("delegate:"):]:
        steps = [delegate(accelerator[len("delegate:"):])]
    else:
        raise ModelError(f"accelerator {accelerator!r} is not one of auto, npu, gpu, cpu, "
                         "delegate:/path/lib.so")

    attempts: list[Attempt] = []
    for backend, attempt in steps:
        try:
            runners, reason = attempt()
        except _SkipError as skip:
            attempts.append(Attempt(backend, False, str(skip)))
            log.info("model=%s backend=%s skipped: %s", name, backend, skip)
            continue
        attempts.append(Attempt(backend, True, reason))
        log.info("model=%s backend=%s selected (requested %s): %s", name, backend, accelerator, reason)
        return Model(spec, runners, backend, attempts, accelerator)
    raise ModelError(f"model {name!r} cannot run with accelerator={accelerator}: "
                     + "; ".join(f"{a.backend}: {a.reason}" for a in attempts))
