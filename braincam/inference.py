"""ONNX Runtime inference over a model directory: the one code path the service
and the evaluation tools share.

Providers are requested in order (CUDA first by default) and the ones a session
really runs on are read back from `session.get_providers()`: ORT silently falls
back to CPU when the CUDA libraries are missing, and we report that honestly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from braincam.model_spec import (
    ACTIVATIONS_OUTPUT,
    CLASS_OUTPUT,
    GRADIENTS_OUTPUT,
    IMAGE_INPUT,
    OOD_SCORE_OUTPUT,
    PROBABILITIES_OUTPUT,
    TARGET_INPUT,
    ModelSpec,
    load_spec,
)

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEFAULT_PROVIDERS: tuple[str, ...] = (CUDA, CPU)


@dataclass(frozen=True)
class GradcamOutput:
    """What one run of gradcam.onnx returns, per batch item."""

    probabilities: np.ndarray  # [N, K]
    class_index: np.ndarray  # [N] int64, the explained class
    activations: np.ndarray  # [N, h, w, C]
    gradients: np.ndarray  # [N, h, w, C], d(pre-softmax score of class_index)/d(activations)
    ood_score: np.ndarray | None = None  # [N], models with an out-of-distribution detector


@dataclass(frozen=True)
class AttributionOutput:
    """What one run of attribution.onnx returns: per requested layer name its
    activations and gradients [N, h, w, C], and the image gradient (model layout)."""

    probabilities: np.ndarray  # [N, K]
    class_index: np.ndarray  # [N] int64
    layers: dict[str, tuple[np.ndarray, np.ndarray]]
    image_gradients: np.ndarray | None


@dataclass(frozen=True)
class Classified:
    """What one run of classifier.onnx returns."""

    probabilities: np.ndarray  # [N, K]
    ood_score: np.ndarray | None  # [N], None for models without a detector


@dataclass
class ProviderReport:
    requested: list[str]
    available: list[str]
    active: list[str]
    warnings: list[str] = field(default_factory=list)

    @property
    def gpu(self) -> bool:
        return CUDA in self.active


def _select_providers(
    requested: Sequence[str], available: Sequence[str]
) -> tuple[list[str], list[str]]:
    usable = [p for p in requested if p in available]
    warnings = [
        f"{p} was requested but this onnxruntime build does not provide it "
        f"(available: {', '.join(available)})"
        for p in requested
        if p not in available
    ]
    if not usable:
        usable = [CPU]
        warnings.append(f"none of the requested providers is available; using {CPU}")
    return usable, warnings


class OnnxModel:
    """The graphs of a model directory (classifier, and gradcam when present) in ONNX
    Runtime sessions."""

    def __init__(
        self,
        model_dir: str | Path,
        providers: Sequence[str] = DEFAULT_PROVIDERS,
        intra_op_threads: int | None = None,
        allow_spinning: bool | None = None,
        verify: bool = True,
    ) -> None:
        import onnxruntime as ort

        self.model_dir = Path(model_dir)
        self.spec: ModelSpec = load_spec(self.model_dir, verify=verify)
        available = list(ort.get_available_providers())
        usable, warnings = _select_providers(list(providers), available)
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        if allow_spinning is not None:  # None: ORT's default (spin)
            options.add_session_config_entry(
                "session.intra_op.allow_spinning", "1" if allow_spinning else "0"
            )
        graphs = self.spec.graphs
        self.classifier = ort.InferenceSession(
            str(self.model_dir / graphs.classifier.file), options, providers=usable
        )
        # A model without a Grad-CAM graph is explained by occlusion (classifier only).
        self.gradcam_session = (
            None
            if graphs.gradcam is None
            else ort.InferenceSession(
                str(self.model_dir / graphs.gradcam.file), options, providers=usable
            )
        )
        # Several layers and the image gradient (optional; `python -m exporter attribution`).
        self.attribution_session = (
            None
            if graphs.attribution is None or self.spec.attribution is None
            else ort.InferenceSession(
                str(self.model_dir / graphs.attribution.file), options, providers=usable
            )
        )
        active = list(self.classifier.get_providers())
        for p in usable:
            if p != CPU and p not in active:
                warnings.append(
                    f"{p} is installed but could not be initialised; running on {active}"
                )
        for message in warnings:
            log.warning(message)
        self.providers = ProviderReport(
            requested=list(providers), available=available, active=active, warnings=warnings
        )
        # model.json's `ood` names the score output; every graph must really have it.
        self.has_ood = self.spec.ood is not None and all(
            self.spec.ood.output in {o.name for o in s.get_outputs()}
            for s in (self.classifier, self.gradcam_session)
            if s is not None
        )
        if self.spec.ood is not None and not self.has_ood:
            raise ValueError(
                f"model.json describes an out-of-distribution detector but the graphs have "
                f"no '{self.spec.ood.output}' output"
            )

    @property
    def labels(self) -> list[str]:
        return self.spec.labels

    @property
    def has_gradcam(self) -> bool:
        return self.gradcam_session is not None

    @property
    def has_attribution(self) -> bool:
        return self.attribution_session is not None

    def attribution(
        self,
        batch: np.ndarray,
        targets: np.ndarray | Sequence[int] | None = None,
        layers: Sequence[str] = (),
        image_gradients: bool = False,
    ) -> AttributionOutput:
        """One run of attribution.onnx fetching only the named layers (and the image
        gradient when asked); target -1 (or None) explains the predicted class."""
        if self.attribution_session is None or self.spec.attribution is None:
            raise RuntimeError(f"the model in {self.model_dir} has no attribution graph")
        n = batch.shape[0]
        target = (
            np.full((n,), -1, dtype=np.int64)
            if targets is None
            else np.asarray(targets, dtype=np.int64)
        )
        names = [PROBABILITIES_OUTPUT, CLASS_OUTPUT]
        entries = []
        for name in layers:
            entry = self.spec.attribution.layer(name)
            if entry is None:
                raise KeyError(name)
            entries.append(entry)
            names += [entry.activations, entry.gradients]
        if image_gradients:
            names.append(self.spec.attribution.image_gradients)
        out = self.attribution_session.run(names, {IMAGE_INPUT: batch, TARGET_INPUT: target})
        maps = {
            e.name: (np.asarray(out[2 + 2 * i]), np.asarray(out[3 + 2 * i]))
            for i, e in enumerate(entries)
        }
        return AttributionOutput(
            np.asarray(out[0]), np.asarray(out[1]), maps,
            np.asarray(out[-1]) if image_gradients else None,
        )

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """float32 [N,H,W,C] -> probabilities [N,K]."""
        (probs,) = self.classifier.run([PROBABILITIES_OUTPUT], {IMAGE_INPUT: batch})
        return np.asarray(probs)

    def classify(self, batch: np.ndarray) -> Classified:
        """Probabilities and, with a detector, the out-of-distribution score: one run."""
        if not self.has_ood:
            return Classified(self.predict(batch), None)
        probs, score = self.classifier.run(
            [PROBABILITIES_OUTPUT, OOD_SCORE_OUTPUT], {IMAGE_INPUT: batch}
        )
        return Classified(np.asarray(probs), np.asarray(score))

    def gradcam(
        self, batch: np.ndarray, targets: np.ndarray | Sequence[int] | None = None
    ) -> GradcamOutput:
        """One forward+backward run; target -1 (or None) explains the predicted class."""
        if self.gradcam_session is None:
            raise RuntimeError(
                f"the model in {self.model_dir} has no Grad-CAM graph: explain it by occlusion"
            )
        n = batch.shape[0]
        target = (
            np.full((n,), -1, dtype=np.int64)
            if targets is None
            else np.asarray(targets, dtype=np.int64)
        )
        names = [PROBABILITIES_OUTPUT, CLASS_OUTPUT, ACTIVATIONS_OUTPUT, GRADIENTS_OUTPUT]
        if self.has_ood:
            names.append(OOD_SCORE_OUTPUT)
        out = self.gradcam_session.run(names, {IMAGE_INPUT: batch, TARGET_INPUT: target})
        probs, cls, acts, grads = out[:4]
        return GradcamOutput(
            np.asarray(probs),
            np.asarray(cls),
            np.asarray(acts),
            np.asarray(grads),
            np.asarray(out[4]) if self.has_ood else None,
        )

    def warmup(self) -> None:
        """One inference through each graph, so the first request pays no set-up cost."""
        x = np.zeros((1, *self.spec.input_shape), dtype=np.float32)
        self.predict(x)
        if self.has_gradcam:
            self.gradcam(x)
