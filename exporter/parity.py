"""The gate: nothing ships unless ONNX Runtime and Keras agree numerically."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from braincam.model_spec import (
    ACTIVATIONS_OUTPUT,
    CLASS_OUTPUT,
    GRADIENTS_OUTPUT,
    IMAGE_INPUT,
    PROBABILITIES_OUTPUT,
    TARGET_INPUT,
)
from exporter.graphs import gradcam_outputs
from exporter.model_split import ModelSplit, keras_probabilities

PROBABILITY_TOLERANCE = 1e-4  # max |p_onnx - p_keras|
RELATIVE_TOLERANCE = 1e-4  # max |a_onnx - a_keras| / max |a_keras|, same for gradients
MIN_INPUTS = 16


@dataclass
class ParityReport:
    n_inputs: int
    figures: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_json(self) -> dict[str, Any]:
        return {
            "n_inputs": self.n_inputs,
            "tolerances": {
                "probabilities_abs": PROBABILITY_TOLERANCE,
                "relative": RELATIVE_TOLERANCE,
            },
            **{k: float(v) for k, v in self.figures.items()},
            "passed": self.passed,
        }


def _relative(a: np.ndarray, ref: np.ndarray) -> float:
    scale = float(np.abs(ref).max())
    return float(np.abs(a - ref).max()) / (scale if scale > 0 else 1.0)


def check_parity(
    model: Any, split: ModelSplit, classifier_path: Path, gradcam_path: Path, x: np.ndarray
) -> ParityReport:
    """Compare both ONNX graphs (ORT, CPU) with Keras on real preprocessed inputs."""
    import onnxruntime as ort

    report = ParityReport(n_inputs=int(x.shape[0]))
    if x.shape[0] < MIN_INPUTS:
        report.failures.append(f"parity needs at least {MIN_INPUTS} inputs, got {x.shape[0]}")
        return report
    cpu = ["CPUExecutionProvider"]
    classifier = ort.InferenceSession(str(classifier_path), providers=cpu)
    gradcam = ort.InferenceSession(str(gradcam_path), providers=cpu)

    keras_probs = keras_probabilities(model, x, split.output_kind)
    (onnx_probs,) = classifier.run([PROBABILITIES_OUTPUT], {IMAGE_INPUT: x})
    report.figures["classifier_probabilities_max_abs"] = float(
        np.abs(onnx_probs - keras_probs).max()
    )

    k = split.num_classes
    predicted = np.argmax(keras_probs, axis=1)
    # The predicted class (-1) and an explicit other class: both target paths are checked.
    for tag, targets in (("predicted", np.full(len(x), -1)), ("other", (predicted + 1) % k)):
        t = targets.astype(np.int64)
        ref = {
            key: v.numpy()
            for key, v in gradcam_outputs(
                split, tf.constant(x), tf.constant(t), hand_written=False
            ).items()
        }
        probs, cls, acts, grads = gradcam.run(
            [PROBABILITIES_OUTPUT, CLASS_OUTPUT, ACTIVATIONS_OUTPUT, GRADIENTS_OUTPUT],
            {IMAGE_INPUT: x, TARGET_INPUT: t},
        )
        report.figures[f"gradcam_{tag}_probabilities_max_abs"] = float(
            np.abs(probs - keras_probs).max()
        )
        report.figures[f"gradcam_{tag}_activations_rel"] = _relative(acts, ref[ACTIVATIONS_OUTPUT])
        report.figures[f"gradcam_{tag}_gradients_rel"] = _relative(grads, ref[GRADIENTS_OUTPUT])
        if not np.array_equal(cls, ref[CLASS_OUTPUT]):
            report.failures.append(f"gradcam ({tag}): explained class differs from TensorFlow's")
        if float(np.abs(ref[GRADIENTS_OUTPUT]).max()) == 0.0:
            report.failures.append(f"gradcam ({tag}): TensorFlow's gradients are all zero")

    for name, value in report.figures.items():
        limit = PROBABILITY_TOLERANCE if name.endswith("_max_abs") else RELATIVE_TOLERANCE
        if not np.isfinite(value) or value > limit:
            report.failures.append(f"{name} = {value:.3g} exceeds {limit:g}")
    return report
