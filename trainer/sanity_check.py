"""Model-parameter randomisation test of the CAM methods (Adebayo et al., NeurIPS 2018).

A map that explains what a model learned must change when the learned weights are
destroyed. The check shuffles the values of every kernel of the Keras model (conv
and dense: each tensor keeps its distribution and loses its structure; biases and
BatchNorm statistics stay), exports that model through the real exporter (parity
gate included), explains the same images with both ONNX models and compares each
method's maps by Spearman rank correlation on the explained layer's own grid.
Near 0: the map depends on what was learned. Near 1: the method draws about the same
map whatever the weights are, i.e. it shows the image, not the model.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from braincam.cam import compute_cam
from braincam.inference import OnnxModel

log = logging.getLogger(__name__)


def shuffled_kernels_model(keras_path: Path, seed: int = 0) -> Any:
    """The Keras model with each kernel's values permuted (same seed, same model)."""
    from exporter.export import load_keras

    model = load_keras(keras_path)
    rng = np.random.default_rng(seed)
    weights = [
        rng.permutation(w.ravel()).reshape(w.shape) if w.ndim >= 2 else w
        for w in model.get_weights()
    ]
    model.set_weights(weights)
    return model


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of two maps; NaN when either is constant (e.g. all zero)."""
    from scipy.stats import spearmanr

    x, y = np.ravel(a), np.ravel(b)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def randomization_check(
    model: OnnxModel,
    keras_path: Path,
    x: np.ndarray,
    targets: np.ndarray,
    methods: list[str],
    calibration: Path,
    seed: int = 0,
) -> dict[str, Any]:
    """Per method: mean rank correlation of trained vs shuffled-weights maps.

    `x` [N,H,W,C] are preprocessed images, `targets` the classes to explain.
    """
    from exporter.errors import ExportError
    from exporter.export import export_model

    with tempfile.TemporaryDirectory() as tmp:
        keras_file = Path(tmp) / "shuffled.keras"
        shuffled_kernels_model(keras_path, seed).save(keras_file)
        out = Path(tmp) / "model"
        spec = model.spec
        try:
            export_model(
                keras_file,
                out,
                labels=spec.labels,
                layer=spec.explanation.layer,
                scale=spec.preprocessing.scale,
                task=spec.task,
                calibration=calibration,
            )
        except ExportError as exc:  # e.g. the parity gate on float ties of random weights
            log.warning("the shuffled-weights model did not export: %s", exc)
            return {"n_images": len(x), "seed": seed, "error": str(exc), "methods": {}}
        shuffled = OnnxModel(out, providers=model.providers.active)
        a = model.gradcam(x, targets)
        b = shuffled.gradcam(x, targets)
    result: dict[str, Any] = {"n_images": len(x), "seed": seed, "methods": {}}
    for method in methods:
        maps_a = compute_cam(method, a.activations, a.gradients)
        maps_b = compute_cam(method, b.activations, b.gradients)
        rhos = np.array([rank_correlation(p, q) for p, q in zip(maps_a, maps_b, strict=True)])
        defined = rhos[~np.isnan(rhos)]
        result["methods"][method] = {
            "mean_rank_correlation": float(defined.mean()) if defined.size else None,
            "n_defined": int(defined.size),
        }
    return result
