"""Temperature scaling of a trained model, fitted on its validation split.

The temperature travels in run.json (`calibration`); the exporter applies it inside
both ONNX graphs, so every consumer gets the same calibrated probabilities.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from braincam.calibration import (
    ECE_BINS,
    calibration_figures,
    fit_temperature,
    reliability_bins,
    softmax,
)


def model_logits(
    model: keras.Model, explain_layer: str, x: np.ndarray, batch_size: int
) -> np.ndarray:
    """The pre-softmax scores [N,K], computed as the exported graphs compute them."""
    from exporter.keras_layers import choose_layer, forward  # the exporter's own tap

    target = choose_layer(model, explain_layer)
    fn = tf.function(lambda t: forward(model, target, t)[0], autograph=False,
                     reduce_retracing=True)
    parts = [fn(tf.constant(x[i : i + batch_size])).numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(parts).astype(np.float64)


def calibrate(
    val_logits: np.ndarray, y_val: np.ndarray, test_logits: np.ndarray, y_test: np.ndarray
) -> dict[str, Any]:
    """Fit T on validation; ECE (15 bins), Brier and NLL before/after on both splits."""
    t, at_bound = fit_temperature(val_logits, y_val)
    return {
        "method": "temperature",
        "temperature": t,
        "at_bound": at_bound,
        "fit_size": len(y_val),
        "ece_bins": ECE_BINS,
        "validation": calibration_figures(val_logits, y_val, t),
        "test": calibration_figures(test_logits, y_test, t),
        "reliability_test": {
            "before": reliability_bins(softmax(test_logits), y_test),
            "after": reliability_bins(softmax(test_logits, t), y_test),
        },
    }
