"""The maps an audit scores: every method's, for a batch of images and their classes.

Gradient methods read one run of the Grad-CAM graph (braincam.cam); occlusion runs the
classifier (braincam.occlusion). A session other than the model's own can be passed
in: the randomisation test explains the same images with edited copies of the graphs.
Images are [N,H,W,C] here whatever the model's layout; a `nchw` model gets them
transposed at the session's door.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from braincam.cam import compute_cam
from braincam.inference import OnnxModel
from braincam.model_spec import (
    ACTIVATIONS_OUTPUT,
    GRADIENTS_OUTPUT,
    IMAGE_INPUT,
    PROBABILITIES_OUTPUT,
    TARGET_INPUT,
)
from braincam.occlusion import OCCLUSION, OcclusionSensitivity

MAX_BATCH = 64  # images per ORT run


class Explainer:
    """Maps and predictions of one model, in its input resolution or its layer grid."""

    def __init__(self, model: OnnxModel, methods: Sequence[str]) -> None:
        self.model = model
        self.methods = list(methods)
        self.nchw = model.spec.preprocessing.layout == "nchw"
        pre = model.spec.preprocessing
        self.size = (pre.width, pre.height)

    def _to_model(self, batch: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(batch.transpose(0, 3, 1, 2) if self.nchw else batch)

    def to_hwc(self, batch: np.ndarray) -> np.ndarray:
        """A batch in the model's layout -> [N,H,W,C]."""
        return np.ascontiguousarray(batch.transpose(0, 2, 3, 1) if self.nchw else batch)

    def predict(self, batch: np.ndarray, session: Any = None) -> np.ndarray:
        """float32 [N,H,W,C] -> probabilities [N,K], MAX_BATCH images per run."""
        sess = session or self.model.classifier
        parts = [
            sess.run([PROBABILITIES_OUTPUT],
                     {IMAGE_INPUT: self._to_model(batch[i : i + MAX_BATCH])})[0]
            for i in range(0, len(batch), MAX_BATCH)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.model.labels)))

    def maps(
        self,
        images: np.ndarray,
        targets: np.ndarray,
        at_input: bool = True,
        gradcam_session: Any = None,
        classifier_session: Any = None,
    ) -> dict[str, np.ndarray]:
        """{method: [N,h,w] in [0,1]}: at the model's input size, or (at_input=False)
        on the explained layer's own grid (occlusion: always the input size)."""
        targets = np.asarray(targets, dtype=np.int64)
        out: dict[str, list[np.ndarray]] = {m: [] for m in self.methods}
        gradient_methods = [m for m in self.methods if m != OCCLUSION]
        size = self.size if at_input else None
        for i in range(0, len(images), MAX_BATCH):
            chunk, t = images[i : i + MAX_BATCH], targets[i : i + MAX_BATCH]
            if gradient_methods:
                sess = gradcam_session or self.model.gradcam_session
                if sess is None:
                    raise ValueError(f"{self.model.model_dir} has no Grad-CAM graph for "
                                     f"{', '.join(gradient_methods)}")
                acts, grads = sess.run([ACTIVATIONS_OUTPUT, GRADIENTS_OUTPUT],
                                       {IMAGE_INPUT: self._to_model(chunk), TARGET_INPUT: t})
                for m in gradient_methods:
                    out[m].append(compute_cam(m, acts, grads, size=size))
            if OCCLUSION in self.methods:
                occlusion = OcclusionSensitivity()
                maps = occlusion(lambda b: self.predict(b, classifier_session), chunk, t,
                                 self.size)
                out[OCCLUSION].append(maps)
        return {m: np.concatenate(v) for m, v in out.items()}
