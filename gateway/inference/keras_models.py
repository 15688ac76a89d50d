"""The TensorFlow half of training (the optional `train` extra): small Keras MLPs and their full-int8
LiteRT conversion. edge_models/train.py (the shipped models) and `sgw model train` (a user's own) both
build, fit and convert here, so the two cannot drift apart.

TensorFlow is imported by `load_tf()` only, inside the functions that need it: an sgw install without the
train extra imports this module's callers (gateway/inference/training.py) and never this import.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.errors import LocalError

INSTALL_HINT = "pip install 'sgw[train]'"


def load_tf() -> Any:
    """The tensorflow module, seeded threads limited; LocalError naming the extra when it is missing."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before the first import: no banner on stderr
    try:
        import tensorflow as tf  # noqa: PLC0415 - the optional train extra
    except ImportError:
        raise LocalError(f"training needs the train extra (TensorFlow), which is not installed: "
                         f"{INSTALL_HINT}") from None
    return tf


def deterministic(seed: int, threads: int = 2) -> None:
    """The same data and seed give the same weights (op determinism, fixed thread pools)."""
    t = load_tf()
    # a fresh Keras session: layer and tensor names (which the converted file records) restart, so a
    # second training in one process writes the same bytes as the first
    t.keras.backend.clear_session()
    t.config.threading.set_intra_op_parallelism_threads(threads)
    t.config.threading.set_inter_op_parallelism_threads(1)
    t.keras.utils.set_random_seed(seed)
    t.config.experimental.enable_op_determinism()


def build(n_in: int, hidden: int, n_out: int, *, activation: str | None, batch: int | None,
          layers: int = 1) -> Any:
    keras = load_tf().keras
    inp = keras.Input(shape=(n_in,), batch_size=batch, name="features")
    h = inp
    for i in range(layers):
        h = keras.layers.Dense(hidden, activation="relu", name="hidden" if i == 0 else f"hidden{i + 1}")(h)
    out = keras.layers.Dense(n_out, activation=activation, name="out")(h)
    return keras.Model(inp, out)


def fit(model: Any, x: npt.NDArray[Any], y: npt.NDArray[Any], *, loss: Any, epochs: int,
        sample_weight: npt.NDArray[Any] | None = None) -> None:
    model.compile(optimizer=load_tf().keras.optimizers.Adam(3e-3), loss=loss)
    model.fit(x, y, sample_weight=sample_weight, epochs=epochs, batch_size=128, verbose=0, shuffle=True)


def convert(trained: Any, make: Callable[[int], Any], rep: npt.NDArray[np.float32], *, batch: int,
            int8: bool) -> bytes:
    """The trained weights in a fixed-batch model, converted (full int8: int8 in and out, calibrated on
    rep, the same windows for every batch size so that all variants share their scales)."""
    t = load_tf()
    fixed = make(batch)
    fixed.set_weights(trained.get_weights())
    conv = t.lite.TFLiteConverter.from_keras_model(fixed)
    if int8:
        conv.optimizations = [t.lite.Optimize.DEFAULT]

        def representative() -> Iterator[list[npt.NDArray[np.float32]]]:
            for i in range(0, len(rep) - batch + 1, batch):
                yield [rep[i:i + batch]]
        conv.representative_dataset = representative
        conv.target_spec.supported_ops = [t.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = t.int8
        conv.inference_output_type = t.int8
    return bytes(conv.convert())


def fit_mlp(z: npt.NDArray[np.float32], y: npt.NDArray[Any], weights: npt.NDArray[np.float32], *, n_out: int,
            hidden: int, layers: int, activation: str | None, loss: str, batches: tuple[int, ...], seed: int,
            epochs: int) -> tuple[dict[int, bytes], npt.NDArray[np.float32]]:
    """training.Fitter: fit an MLP on standardized features z, then its full-int8 file per batch size
    and the float model's outputs on z (for verification). loss "binary_logit": one logit output."""
    deterministic(seed)

    def make(b: int | None) -> Any:
        return build(z.shape[1], hidden, n_out, activation=activation, batch=b, layers=layers)

    model = make(None)
    binary = load_tf().keras.losses.BinaryCrossentropy(from_logits=True)
    loss_obj = binary if loss == "binary_logit" else loss
    fit(model, z, y, loss=loss_obj, epochs=epochs, sample_weight=weights)
    rep = z[np.random.default_rng(seed).permutation(len(z))[:512]]
    # the calibration generator yields whole batches only: a length every batch size divides (rows
    # repeated, which leaves the calibrated ranges as they were) makes every variant see the same rows,
    # so all share their int8 scales and answer a window alike whatever batch it lands in
    whole = -(-len(rep) // max(batches)) * max(batches)
    rep = np.resize(rep, (whole, z.shape[1]))
    # the converter prints its SavedModel export on stdout, which belongs to the CLI's --json
    with contextlib.redirect_stdout(sys.stderr):
        blobs = {b: convert(model, make, rep, batch=b, int8=True) for b in batches}
    return blobs, np.asarray(model.predict(z, batch_size=256, verbose=0), dtype=np.float32)
