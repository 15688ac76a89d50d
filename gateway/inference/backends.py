"""LiteRT runners and the probes that decide which accelerator may be tried.

A runner owns one fixed-batch model on one backend and maps a quantized input batch to the raw output.
Probes answer "is it worth trying, and if not why" without side effects where possible, so the engine can
log a reason for every step it skips.

NPU honesty: CompiledModel with NPU|CPU runs silently on the CPU when no NPU exists, and
is_fully_accelerated() is False for plain CPU too, so neither proves an NPU. We call it an NPU only when
(1) a LiteRT vendor dispatch library is present, (2) the kernel exposes an NPU device node, and
(3) after compiling with NPU|CPU the runtime reports the whole graph accelerated. Anything less is
reported as "no NPU" with the missing piece named.
"""

from __future__ import annotations

import ctypes
import glob
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import ai_edge_litert
import numpy as np
import numpy.typing as npt
from ai_edge_litert.compiled_model import CompiledModel
from ai_edge_litert.cpu_options import CpuOptions
from ai_edge_litert.environment import Environment
from ai_edge_litert.hardware_accelerator import HardwareAccelerator
from ai_edge_litert.interpreter import Interpreter
from ai_edge_litert.interpreter import load_delegate as _load_delegate
from ai_edge_litert.options import Options

# Device nodes of NPUs LiteRT has dispatch libraries for (Linux): the accel subsystem (Intel NPU, AMD
# XDNA), Qualcomm's Hexagon via FastRPC, MediaTek APU, Google Edge TPU (apex), Samsung Exynos NPU.
NPU_DEVICE_GLOBS: tuple[str, ...] = (
    "/dev/accel/accel*", "/dev/fastrpc-cdsp*", "/dev/apusys*", "/dev/apex_*", "/dev/vertex*",
)
DELEGATE_SYMBOL = "tflite_plugin_create_delegate"


class Runner(Protocol):
    batch: int

    def run(self, q: npt.NDArray[Any]) -> npt.NDArray[Any]: ...


class InterpreterRunner:
    """The classic Interpreter: the CPU path, optionally with an external delegate."""

    def __init__(self, blob: bytes, batch: int, num_threads: int, delegates: Sequence[Any] = ()) -> None:
        self.batch = batch
        self._it = Interpreter(model_content=blob, num_threads=num_threads,
                               experimental_delegates=list(delegates) or None)
        self._it.allocate_tensors()
        self._in = self._it.get_input_details()[0]["index"]
        self._out = self._it.get_output_details()[0]["index"]

    def copy_in(self, q: npt.NDArray[Any]) -> None:
        """Only the input copy: the floor that benchmarks/bench_inference.py compares invokes with."""
        self._it.set_tensor(self._in, q)

    def run(self, q: npt.NDArray[Any]) -> npt.NDArray[Any]:
        self._it.set_tensor(self._in, q)
        self._it.invoke()
        return np.asarray(self._it.get_tensor(self._out))


class CompiledRunner:
    """CompiledModel (LiteRT 2 API), needed for NPU and GPU; binds only fixed-batch models."""

    def __init__(self, blob: bytes, batch: int, out_shape: tuple[int, ...], out_dtype: Any, *,
                 accelerators: Any, num_threads: int, environment: Any = None) -> None:
        self.batch = batch
        self._shape, self._n, self._dtype = out_shape, int(np.prod(out_shape)), out_dtype
        opts = Options(hardware_accelerators=accelerators, cpu_options=CpuOptions(num_threads=num_threads))
        self._cm = CompiledModel.from_buffer(blob, environment=environment, options=opts)
        self._ib = self._cm.create_input_buffers(0)
        self._ob = self._cm.create_output_buffers(0)
        self.fully_accelerated = bool(self._cm.is_fully_accelerated())

    def run(self, q: npt.NDArray[Any]) -> npt.NDArray[Any]:
        self._ib[0].write(q)
        self._cm.run_by_index(0, self._ib, self._ob)
        return np.asarray(self._ob[0].read(self._n, self._dtype)).reshape(self._shape)


def find_dispatch_library(explicit: str | None = None) -> str | None:
    """A LiteRT NPU dispatch library: the configured folder, else one shipped inside ai_edge_litert."""
    if explicit:
        return explicit if any(Path(explicit).glob("libLiteRtDispatch_*.so")) else None
    found = sorted(Path(ai_edge_litert.__file__).parent.glob("vendors/*/dispatch/libLiteRtDispatch_*.so"))
    return str(found[0].parent) if found else None


def npu_devices(globs: Sequence[str] | None = None) -> list[str]:
    # absolute /dev patterns: pathlib's glob takes only relative ones
    return sorted(p for g in (NPU_DEVICE_GLOBS if globs is None else globs) for p in glob.glob(g))  # noqa: PTH207


def npu_environment(dispatch_dir: str) -> Any:
    return Environment.create(dispatch_library_path=dispatch_dir)


def accelerator(name: str) -> Any:
    return {"npu": HardwareAccelerator.NPU | HardwareAccelerator.CPU, "gpu": HardwareAccelerator.GPU,
            "cpu": HardwareAccelerator.CPU}[name]


def check_delegate_library(path: str) -> str | None:
    """None if `path` loads and exports the delegate entry point, else why not (no exception)."""
    if not Path(path).is_file():
        return f"delegate library {path} does not exist"
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        return f"delegate library {path} cannot be loaded: {exc}"
    try:
        getattr(lib, DELEGATE_SYMBOL)
    except AttributeError:
        return f"{path} is not a TFLite external delegate: it has no {DELEGATE_SYMBOL} symbol"
    return None


def load_delegate(path: str, options: Mapping[str, str] | None) -> Any:
    """The delegate object; OSError, AttributeError and ValueError all mean 'this delegate cannot run'."""
    return _load_delegate(path, dict(options or {}))
