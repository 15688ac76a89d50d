"""LiteRT inference: the verified model manifest, backend selection and the shared feature extraction."""

from gateway.inference.engine import Attempt, Model, Prefilter, load_model, load_prefilter
from gateway.inference.manifest import default_manifest_path, load_manifest

__all__ = ["Attempt", "Model", "Prefilter", "default_manifest_path", "load_manifest", "load_model",
           "load_prefilter"]
