"""edge_models/manifest.json: what each shipped model is, and the sha256 every file must match.

A model file is read once into memory, hashed, and only those verified bytes are given to LiteRT, so a
file swapped between the check and the load cannot be run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from gateway.errors import ModelError


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str
    scale: float
    zero_point: int


@dataclass(frozen=True)
class Variant:
    batch: int
    path: Path
    sha256: str
    input: TensorSpec
    output: TensorSpec

    def read_verified(self) -> bytes:
        try:
            blob = self.path.read_bytes()
        except OSError as exc:
            raise ModelError(f"model file {self.path} cannot be read: {exc.strerror or exc}") from exc
        digest = hashlib.sha256(blob).hexdigest()
        if digest != self.sha256:
            raise ModelError(f"model file {self.path} does not match its manifest (sha256 {digest}, "
                             f"expected {self.sha256}): refusing to load a modified model")
        return blob


@dataclass(frozen=True)
class Preprocessing:
    features: str
    sample_rate_hz: float
    window: int
    bands_hz: tuple[float, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: str
    labels: tuple[str, ...]
    threshold: float | None
    training_seed: int
    preprocessing: Preprocessing
    variants: tuple[Variant, ...]  # sorted by batch size
    quality: Mapping[str, Any] = field(default_factory=dict)
    # the `unknown` rule's constants (gateway/inference/decision.py), for a classifier that has one
    open_set: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Manifest:
    path: Path
    models: Mapping[str, ModelSpec]

    def model(self, name: str) -> ModelSpec:
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(sorted(self.models))
            raise ModelError(f"no model {name!r} in {self.path}; it has {known}") from None


def default_manifest_path() -> Path:
    """The manifest shipped with sgw: edge_models/ in a checkout, gateway/_edge_models/ in a wheel."""
    packaged = Path(str(resources.files("gateway"))) / "_edge_models" / "manifest.json"
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / "edge_models" / "manifest.json"


def _tensor(d: Mapping[str, Any]) -> TensorSpec:
    shape = tuple(int(s) for s in d["shape"])
    return TensorSpec(shape, str(d["dtype"]), float(d["scale"]), int(d["zero_point"]))


def _spec(name: str, d: Mapping[str, Any], folder: Path) -> ModelSpec:
    p = d["preprocessing"]
    prep = Preprocessing(str(p["features"]), float(p["sample_rate_hz"]), int(p["window"]),
                         tuple(float(v) for v in p["bands_hz"]), tuple(float(v) for v in p["mean"]),
                         tuple(float(v) for v in p["std"]))
    variants = tuple(sorted((Variant(int(v["batch"]), folder / str(v["file"]), str(v["sha256"]),
                                     _tensor(v["input"]), _tensor(v["output"])) for v in d["variants"]),
                            key=lambda v: v.batch))
    if not variants:
        raise ModelError(f"model {name!r} lists no files")
    threshold = d.get("threshold")
    return ModelSpec(name, str(d["version"]), tuple(str(s) for s in d["labels"]),
                     None if threshold is None else float(threshold), int(d["training_seed"]), prep, variants,
                     dict(d.get("quality") or {}), d.get("open_set"))


def load_manifest(path: Path | None = None) -> Manifest:
    """Parse a manifest; model paths are relative to its folder. Any defect is a ModelError."""
    path = path or default_manifest_path()
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise ModelError(f"model manifest {path} cannot be read: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ModelError(f"model manifest {path} is not valid JSON: {exc}") from exc
    try:
        models = {name: _spec(name, d, path.parent) for name, d in raw["models"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelError(f"model manifest {path} is malformed: {exc!r}") from exc
    return Manifest(path, models)
