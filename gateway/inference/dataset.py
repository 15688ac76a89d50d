"""The labelled-recordings format `sgw model evaluate` reads: one .npz file (numpy.savez / savez_compressed).

Arrays:
  windows      (n, 128, 3) float16/float32/float64, in g, 1600 Hz, axes x, y, z
  labels       (n,) str: "healthy" or a fault name (any name: those outside the classifier's label set
               are reported as their own rows, e.g. a fault type no model knows)
  machine_ids  (n,) int or str: which machine each window came from; each machine is commissioned
               on its own first healthy windows, in file order
Windows of one machine should be in time order. Every length is checked before use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from gateway.errors import LocalError

MAX_WINDOWS = 2_000_000


class DatasetError(LocalError):
    """A data file that cannot be evaluated; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Dataset:
    windows: npt.NDArray[np.float32]
    labels: npt.NDArray[np.str_]
    machine_ids: npt.NDArray[np.str_]


def load(path: Path, window: int = 128, axes: int = 3) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"windows", "labels", "machine_ids"} - set(z.files)
            if missing:
                raise DatasetError(f"{path}: missing arrays {', '.join(sorted(missing))}")
            w, lab, mid = z["windows"], z["labels"], z["machine_ids"]
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: not a readable .npz file ({exc})") from None
    if w.ndim != 3 or w.shape[1:] != (window, axes) or not 0 < w.shape[0] <= MAX_WINDOWS:
        raise DatasetError(f"{path}: windows must be (n, {window}, {axes}) with 0 < n <= {MAX_WINDOWS}, "
                           f"got {w.shape}")
    if lab.shape != (w.shape[0],) or mid.shape != (w.shape[0],):
        raise DatasetError(f"{path}: labels {lab.shape} and machine_ids {mid.shape} must be ({w.shape[0]},)")
    if w.dtype.kind != "f" or not np.isfinite(w).all():
        raise DatasetError(f"{path}: windows must be finite floats, got {w.dtype}")
    return Dataset(windows=w.astype(np.float32), labels=lab.astype(str), machine_ids=mid.astype(str))
