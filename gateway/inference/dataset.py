"""The labelled-recordings formats `sgw model evaluate` and `sgw model train` read: .npz, or .csv imported.

.npz (numpy.savez / savez_compressed), the native format:

Arrays:
  windows      (n, 128, 3) float16/float32/float64, in g, 1600 Hz, axes x, y, z
  labels       (n,) str: "healthy" or a fault name (any name: those outside the classifier's label set
               are reported as their own rows, e.g. a fault type no model knows)
  machine_ids  (n,) int or str: which machine each window came from; each machine is commissioned
               on its own first healthy windows, in file order
Windows of one machine should be in time order. Every length is checked before use.

.csv (`load_csv`; `sgw model import-csv` turns one into the native .npz): UTF-8, comma-separated, one
row per sample, a header row naming the columns (any order, names case-insensitive, other columns ignored):
  machine_id   which machine the sample came from (any text)
  label        "healthy" or a fault name, as in the .npz
  x, y, z      acceleration in g, sampled at 1600 Hz (no resampling is done: convert first)
  window       optional. With it, the rows of one (machine_id, window) pair are one window and must be
               exactly 128 rows with one label. Without it, each machine's rows are a continuous
               recording in time order, cut into consecutive 128-sample windows; a window ends early
               where the label changes, and such a short piece (and the tail of a recording) is dropped
               and counted, never padded.
A row that does not parse is an error naming the file and the line.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.errors import LocalError

MAX_WINDOWS = 2_000_000
WINDOW, AXES = 128, 3
CSV_COLUMNS = ("machine_id", "label", "x", "y", "z")


class DatasetError(LocalError):
    """A data file that cannot be evaluated; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Dataset:
    windows: npt.NDArray[np.float32]
    labels: npt.NDArray[np.str_]
    machine_ids: npt.NDArray[np.str_]
    # csv only: samples that made no whole window (a label change mid-window, a recording's tail)
    dropped_samples: int = field(default=0, compare=False)

    def save(self, path: Path) -> None:
        """Write the native .npz (windows as float32)."""
        try:
            with path.open("wb") as fh:
                np.savez_compressed(fh, windows=self.windows, labels=self.labels,
                                    machine_ids=self.machine_ids)
        except OSError as exc:
            raise DatasetError(f"{path}: cannot write: {exc.strerror or exc}") from None


def load(path: Path, window: int = WINDOW, axes: int = AXES) -> Dataset:
    """A data file by its suffix: .csv through load_csv, anything else as .npz."""
    if path.suffix.lower() == ".csv":
        return load_csv(path)
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


def load_csv(path: Path) -> Dataset:
    """The .csv format of the module docstring -> Dataset; DatasetError names the file and line."""
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            return _parse_csv(path, csv.reader(fh))
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not UTF-8 text") from None
    except csv.Error as exc:
        raise DatasetError(f"{path}: not CSV ({exc})") from None


def _parse_csv(path: Path, rows: Any) -> Dataset:
    header = next(rows, None)
    if header is None:
        raise DatasetError(f"{path}: empty file")
    names = [h.strip().lower() for h in header]
    missing = [c for c in CSV_COLUMNS if c not in names]
    if missing:
        raise DatasetError(f"{path}: header lacks column(s) {', '.join(missing)} (have {', '.join(names)})")
    col = {c: names.index(c) for c in (*CSV_COLUMNS, "window") if c in names}
    need = max(col.values()) + 1
    has_window = "window" in col
    # per open window key: its label and samples; finished windows in order of completion
    open_: dict[tuple[str, str], tuple[str, list[tuple[float, float, float]]]] = {}
    done_w: list[list[tuple[float, float, float]]] = []
    done_l: list[str] = []
    done_m: list[str] = []
    dropped = 0

    def close(key: tuple[str, str]) -> None:
        nonlocal dropped
        label, samples = open_.pop(key)
        if len(samples) == WINDOW:
            done_w.append(samples)
            done_l.append(label)
            done_m.append(key[0])
        else:
            dropped += len(samples)

    for line, row in enumerate(rows, start=2):
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) < need:
            raise DatasetError(f"{path}:{line}: {len(row)} columns, the header has {len(names)}")
        mid, label = row[col["machine_id"]].strip(), row[col["label"]].strip()
        if not mid or not label:
            raise DatasetError(f"{path}:{line}: empty machine_id or label")
        try:
            xyz = (float(row[col["x"]]), float(row[col["y"]]), float(row[col["z"]]))
        except ValueError:
            raise DatasetError(f"{path}:{line}: x, y, z must be numbers") from None
        if not all(np.isfinite(xyz)):
            raise DatasetError(f"{path}:{line}: x, y, z must be finite")
        key = (mid, row[col["window"]].strip() if has_window else "")
        cur = open_.get(key)
        if cur is not None and cur[0] != label:
            if has_window:
                raise DatasetError(f"{path}:{line}: window {key[1]!r} of machine {mid!r} changes label "
                                   f"from {cur[0]!r} to {label!r}")
            close(key)  # a recording whose label changes: the unfinished window is dropped
            cur = None
        if cur is None:
            cur = open_[key] = (label, [])
        cur[1].append(xyz)
        if len(cur[1]) > WINDOW:
            raise DatasetError(f"{path}:{line}: window {key[1]!r} of machine {mid!r} has more than "
                               f"{WINDOW} rows")
        if not has_window and len(cur[1]) == WINDOW:
            close(key)
        if len(done_w) + len(open_) > MAX_WINDOWS:
            raise DatasetError(f"{path}:{line}: more than {MAX_WINDOWS} windows")
    for key in list(open_):
        if has_window and len(open_[key][1]) != WINDOW:
            raise DatasetError(f"{path}: window {key[1]!r} of machine {key[0]!r} has "
                               f"{len(open_[key][1])} rows, expected {WINDOW}")
        close(key)
    if not done_w:
        raise DatasetError(f"{path}: no whole {WINDOW}-sample window")
    return Dataset(windows=np.asarray(done_w, dtype=np.float32), labels=np.asarray(done_l, dtype=str),
                   machine_ids=np.asarray(done_m, dtype=str), dropped_samples=dropped)
