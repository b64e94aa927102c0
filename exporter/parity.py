"""The gate: nothing ships unless ONNX Runtime and Keras agree numerically."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from braincam.calibration import softmax
from braincam.cam import compute_cam
from braincam.model_spec import (
    ACTIVATIONS_OUTPUT,
    CLASS_OUTPUT,
    GRADIENTS_OUTPUT,
    IMAGE_INPUT,
    OOD_SCORE_OUTPUT,
    PROBABILITIES_OUTPUT,
    TARGET_INPUT,
)
from exporter.keras_layers import KerasTarget, gradients, keras_probabilities
from exporter.ood_fit import TrustFit, score
from exporter.ood_graph import GRID, grid_pool

PROBABILITY_TOLERANCE = 1e-4  # max |p_onnx - p_keras|
RELATIVE_TOLERANCE = 1e-4  # max |a_onnx - a_keras| / max |a_keras|, same for gradients
CAM_TOLERANCE = 1e-3  # max |cam_onnx - cam_keras| of the [0,1]-normalised Grad-CAM map
# max |s_onnx - s_ref| / max |s_ref| of the out-of-distribution score: a Mahalanobis
# distance amplifies float32 rounding of the features along low-variance directions.
OOD_TOLERANCE = 1e-3
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
                "cam_abs": CAM_TOLERANCE,
                "ood_rel": OOD_TOLERANCE,
            },
            **{k: float(v) for k, v in self.figures.items()},
            "passed": self.passed,
        }


def _limit(figure: str) -> float | None:
    if figure.endswith("_end_to_end"):
        return None  # reported, not gated (see check_parity)
    if figure.endswith("_ood_rel"):
        return OOD_TOLERANCE
    if figure.endswith("_cam_max_abs"):
        return CAM_TOLERANCE
    if figure.endswith("_max_abs"):
        return PROBABILITY_TOLERANCE
    return RELATIVE_TOLERANCE


def _relative(a: np.ndarray, ref: np.ndarray) -> float:
    scale = float(np.abs(ref).max())
    return float(np.abs(a - ref).max()) / (scale if scale > 0 else 1.0)


RUN_BATCH = 8  # images per ORT run of the Grad-CAM graph (real-size models' memory)


def _run_batched(session: Any, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    n = len(next(iter(feeds.values())))
    parts = [session.run(names, {k: v[i : i + RUN_BATCH] for k, v in feeds.items()})
             for i in range(0, n, RUN_BATCH)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(names))]


def check_parity(
    model: Any,
    target: KerasTarget,
    classifier_path: Path,
    gradcam_path: Path,
    x: np.ndarray,
    trust: TrustFit | None = None,
    features: dict[str, str] | None = None,
) -> ParityReport:
    """Compare both ONNX graphs (ORT, CPU) with Keras on real preprocessed inputs.

    The reference gradients are TensorFlow's autodiff (tf.GradientTape) on the Keras
    model itself, at the explained layer. With `trust`, the graphs' probabilities are
    softmax(logits / T): they are compared with that of TensorFlow's logits (whose
    T = 1 softmax is checked against Keras's own prediction), and `ood_score` with the
    NumPy score of TensorFlow's features. `features` names what each feature tensor of
    the graphs is on the Keras side: "grid" (the explained layer's activations on a
    grid) or "pooled" (the input of the model's output layer).
    """
    import onnxruntime as ort

    report = ParityReport(n_inputs=int(x.shape[0]))
    if x.shape[0] < MIN_INPUTS:
        report.failures.append(f"parity needs at least {MIN_INPUTS} inputs, got {x.shape[0]}")
        return report
    cpu = ["CPUExecutionProvider"]
    classifier = ort.InferenceSession(str(classifier_path), providers=cpu)
    gradcam = ort.InferenceSession(str(gradcam_path), providers=cpu)

    keras_probs = keras_probabilities(model, x, target.output_kind)
    k = target.num_classes
    predicted = np.argmax(keras_probs, axis=1)
    # The predicted class (-1) and an explicit other class: both target paths are checked.
    refs = {tag: gradients(model, target, x, targets) for tag, targets in
            (("predicted", np.full(len(x), -1)), ("other", (predicted + 1) % k))}
    tf_logits = refs["predicted"]["logits"]
    ref_probs = keras_probs
    ref_score = None
    if trust is not None:
        report.figures["logits_probabilities_max_abs"] = float(
            np.abs(softmax(tf_logits) - keras_probs).max()
        )
        ref_probs = softmax(tf_logits, trust.temperature)
        kind = (features or {}).get(trust.features)
        if kind == "grid":
            feats = grid_pool(refs["predicted"]["activations"], GRID)
        elif kind == "pooled":
            feats = refs["predicted"].get("pooled", tf_logits)
        else:
            feats = tf_logits
        ref_score = score(trust.detector, feats.reshape(len(x), -1), tf_logits, trust.gaussians)
    (onnx_probs,) = _run_batched(classifier, [PROBABILITIES_OUTPUT], {IMAGE_INPUT: x})
    report.figures["classifier_probabilities_max_abs"] = float(
        np.abs(onnx_probs - ref_probs).max()
    )
    if ref_score is not None:
        (onnx_score,) = _run_batched(classifier, [OOD_SCORE_OUTPUT], {IMAGE_INPUT: x})
        report.figures["classifier_ood_rel"] = _relative(onnx_score, ref_score)

    for tag, targets in (("predicted", np.full(len(x), -1)), ("other", (predicted + 1) % k)):
        ref = refs[tag]
        t = targets.astype(np.int64)
        probs, cls, acts, grads = _run_batched(
            gradcam,
            [PROBABILITIES_OUTPUT, CLASS_OUTPUT, ACTIVATIONS_OUTPUT, GRADIENTS_OUTPUT],
            {IMAGE_INPUT: x, TARGET_INPUT: t},
        )
        # Max pooling routes a gradient to the largest activation of its window; where
        # two activations differ by float rounding (~1e-7) ORT and TF may pick different
        # ones. So the exported backward pass is checked against TensorFlow's autodiff
        # given ORT's own activations (the Keras layer's output replaced by them: exact),
        # and the end-to-end figure and the resulting Grad-CAM map are reported beside
        # it (a ReLU whose input rounds to either side of zero flips the same way).
        given = gradients(model, target, x, targets, given=acts)
        f = report.figures
        f[f"gradcam_{tag}_probabilities_max_abs"] = float(np.abs(probs - ref_probs).max())
        if ref_score is not None:
            (g_score,) = _run_batched(gradcam, [OOD_SCORE_OUTPUT],
                                      {IMAGE_INPUT: x, TARGET_INPUT: t})
            f[f"gradcam_{tag}_ood_rel"] = _relative(g_score, ref_score)
        f[f"gradcam_{tag}_activations_rel"] = _relative(acts, ref[ACTIVATIONS_OUTPUT])
        f[f"gradcam_{tag}_gradients_rel"] = _relative(grads, given[GRADIENTS_OUTPUT])
        f[f"gradcam_{tag}_gradients_rel_end_to_end"] = _relative(grads, ref[GRADIENTS_OUTPUT])
        cam = compute_cam("gradcam", acts, grads)
        f[f"gradcam_{tag}_cam_max_abs"] = float(
            np.abs(cam - compute_cam("gradcam", acts, given[GRADIENTS_OUTPUT])).max()
        )
        f[f"gradcam_{tag}_cam_max_abs_end_to_end"] = float(
            np.abs(
                cam - compute_cam("gradcam", ref[ACTIVATIONS_OUTPUT], ref[GRADIENTS_OUTPUT])
            ).max()
        )
        if not np.array_equal(cls, ref[CLASS_OUTPUT]):
            report.failures.append(f"gradcam ({tag}): explained class differs from TensorFlow's")
        if float(np.abs(ref[GRADIENTS_OUTPUT]).max()) == 0.0:
            report.failures.append(f"gradcam ({tag}): TensorFlow's gradients are all zero")

    for name, value in report.figures.items():
        limit = _limit(name)
        if limit is not None and (not np.isfinite(value) or value > limit):
            report.failures.append(f"{name} = {value:.3g} exceeds {limit:g}")
    return report
