"""The Keras reference for the same model: predict(), a tf.function call, GradientTape.

Imported only when the benchmark runs the Keras rows: it needs the `train` extra.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import numpy as np

from benchmarks.direct import BATCHES
from benchmarks.stats import Timing, time_calls
from braincam.cam import compute_cam
from braincam.decoding import decode_image
from braincam.model_spec import ModelSpec
from braincam.preprocessing import preprocess

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def measure(
    keras_path: Path, spec: ModelSpec, data: bytes, repeats: int, max_seconds: float
) -> dict[str, Timing]:
    import keras
    import tensorflow as tf

    from exporter.keras_layers import choose_layer, gradients

    model = keras.models.load_model(keras_path, compile=False)
    target_layer = choose_layer(model, spec.explanation.layer)
    # .numpy() in the timed call: the result must reach the host, as predict()'s does.
    traced = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def call(x: tf.Tensor) -> np.ndarray:
        return np.asarray(traced(x).numpy())

    decoded = decode_image(data)
    x1 = preprocess(decoded.pixels, spec.preprocessing)[None]

    def tape_gradcam(x: tf.Tensor, target: tf.Tensor) -> np.ndarray:
        # TensorFlow autodiff throughout: the textbook GradientTape Grad-CAM (the parity
        # gate's reference), then the same numpy CAM as the ORT path.
        out = gradients(model, target_layer, np.asarray(x), np.asarray(target))
        acts, grads = out["activations"], out["gradients"]
        return compute_cam("gradcam", acts, grads, size=decoded.size)

    rows: dict[str, Timing] = {}
    for n in BATCHES:
        x = np.ascontiguousarray(np.repeat(x1, n, axis=0))
        xt = tf.constant(x)
        target = tf.constant(np.full(n, -1, dtype=np.int64))
        rows[f"keras_predict@{n}"] = time_calls(
            partial(model.predict, x, verbose=0), repeats, max_seconds
        )
        rows[f"keras_tf_function@{n}"] = time_calls(partial(call, xt), repeats, max_seconds)
        rows[f"keras_gradient_tape@{n}"] = time_calls(
            partial(tape_gradcam, xt, target), repeats, max_seconds
        )
    return rows
