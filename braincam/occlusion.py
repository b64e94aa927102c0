"""Occlusion sensitivity (Zeiler & Fergus 2014): a gradient-free map from the classifier alone.

For models without a Grad-CAM graph (no gradcam.onnx) and on request. A patch slides
over the preprocessed image; each occluded copy goes through the classifier, and a
pixel's value is the drop in the target class's probability, averaged over the windows
that cover it. Only the classifier's `predict` is needed, so any model directory can be
explained this way, at the cost of one classifier run per window (batched).

Choices, fixed so maps are comparable across models:
- patch 1/8 of each side (at least 1 px), stride half the patch; a last row/column of
  windows is added flush with the far edge, so every pixel is covered at least once;
- the patch is filled with the image's own per-channel mean after preprocessing: a
  neutral value for the image whatever the model's scaling (0 would be black under
  `unit` scaling but mid-grey under `symmetric`), which removes texture and edges from
  the window without pasting in an intensity the image does not have;
- the score is the probability (the classifier graph outputs no logits); only drops
  (positive evidence for the target) are shown, as for the Grad-CAM family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from braincam.cam import normalize, resize_cam

OCCLUSION = "occlusion"
BATCH_SIZE = 32  # occluded images per classifier run

Predict = Callable[[np.ndarray], np.ndarray]  # float32 [N,H,W,C] -> probabilities [N,K]


@dataclass(frozen=True)
class OcclusionGrid:
    patch: tuple[int, int]  # (height, width) of the occluding patch, in model-input pixels
    stride: tuple[int, int]

    @classmethod
    def for_input(cls, height: int, width: int) -> OcclusionGrid:
        ph, pw = max(1, round(height / 8)), max(1, round(width / 8))
        return cls((ph, pw), (max(1, ph // 2), max(1, pw // 2)))

    def windows(self, height: int, width: int) -> list[tuple[int, int]]:
        """Top-left corners (y, x) of every window, row-major."""
        ys = _starts(height, self.patch[0], self.stride[0])
        xs = _starts(width, self.patch[1], self.stride[1])
        return [(y, x) for y in ys for x in xs]


def _starts(size: int, patch: int, stride: int) -> list[int]:
    last = max(size - patch, 0)
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)  # flush with the far edge: the last pixels are covered too
    return starts


def occlusion_drops(
    predict: Predict,
    images: np.ndarray,
    targets: np.ndarray,
    base: np.ndarray | None = None,
    grid: OcclusionGrid | None = None,
    batch_size: int = BATCH_SIZE,
) -> np.ndarray:
    """Raw maps [N,H,W] float32: the mean drop of p(target) over the windows covering
    each pixel. `base` [N] is p(target) of the unoccluded images (computed if None)."""
    images = np.asarray(images, dtype=np.float32)
    n, height, width, _ = images.shape
    targets = np.asarray(targets, dtype=np.int64).reshape(n)
    if base is None:
        base = predict(images)[np.arange(n), targets]
    grid = grid or OcclusionGrid.for_input(height, width)
    (ph, pw) = grid.patch
    fill = images.mean(axis=(1, 2))  # [N,C]: each image's own mean, per channel
    # Every (image, window) pair, flattened so that a batch of 2 (smooth) fills runs too.
    jobs = [(i, y, x) for i in range(n) for (y, x) in grid.windows(height, width)]
    total = np.zeros((n, height, width), dtype=np.float64)
    count = np.zeros((height, width), dtype=np.float64)
    for y, x in grid.windows(height, width):
        count[y : y + ph, x : x + pw] += 1.0
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        batch = images[[i for i, _, _ in chunk]]  # fancy indexing: a copy
        for b, (i, y, x) in enumerate(chunk):
            batch[b, y : y + ph, x : x + pw, :] = fill[i]
        probs = predict(batch)
        for b, (i, y, x) in enumerate(chunk):
            total[i, y : y + ph, x : x + pw] += base[i] - probs[b, targets[i]]
    return (total / count).astype(np.float32)


class OcclusionSensitivity:
    """The method as the service calls it: maps [N,H,W] in [0,1], like a CAMMethod's.

    `drops` runs the classifier (the costly part), `maps` post-processes like the CAM
    methods do (ReLU, min-max per map, bilinear resize); calling does both.
    """

    name = OCCLUSION

    def drops(
        self,
        predict: Predict,
        images: np.ndarray,
        targets: np.ndarray,
        base: np.ndarray | None = None,
    ) -> np.ndarray:
        return occlusion_drops(predict, images, targets, base)

    def maps(self, drops: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        # Only drops, i.e. regions whose hiding lowers p(target), are evidence for it.
        maps = normalize(np.maximum(drops, 0.0))
        return maps if size is None else resize_cam(maps, size)

    def __call__(
        self,
        predict: Predict,
        images: np.ndarray,
        targets: np.ndarray,
        size: tuple[int, int] | None = None,
    ) -> np.ndarray:
        return self.maps(self.drops(predict, images, targets), size)
