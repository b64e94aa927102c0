"""Faithfulness: does removing what a map calls important change the model's answer?

Deletion removes the map's pixels most-salient first and watches p(class) fall (lower
area = more faithful); insertion keeps only the most salient pixels and fills the rest
(higher area = more faithful). Two ways to remove a pixel:

- `road`: ROAD's noisy linear imputation (braincam/audit/imputation.py), at fractions
  0, 1/steps, ..., 1 of the pixels (ROAD's 10 % steps by default);
- `blur`: braincam.localization's heavy blur, through `causal_aucs` itself, so these
  figures are trainer.explain_eval's for the same map and class.

Each method is read against two maps that know nothing: a random pixel order (chance)
and a uniform map (all pixels tie, so they go in row-major order: top rows first). All
images of one image's ROAD curves go to the model in one call, and so do its blur curves.
The flip share asks the plainest question: does the decided class change when the top
20 % of the map is removed (ROAD imputation)?
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from braincam.audit.imputation import noisy_linear_impute
from braincam.localization import CAUSAL_STEPS, auc, cam_order, causal_aucs, random_order

Predict = Callable[[np.ndarray], np.ndarray]  # float32 [N,H,W,C] -> probabilities [N,K]

ROAD_STEPS = 10
FLIP_FRACTION = 0.2
RANDOM = "random"
UNIFORM = "uniform"
REFERENCES = (RANDOM, UNIFORM)


@dataclass(frozen=True)
class FaithfulnessSettings:
    road_steps: int = ROAD_STEPS
    blur_steps: int = CAUSAL_STEPS
    flip_fraction: float = FLIP_FRACTION
    seed: int = 0


def _removed_masks(order: np.ndarray, shape: tuple[int, int], fractions: np.ndarray,
                   mode: str) -> list[np.ndarray]:
    """[H,W] masks of the pixels to impute at each fraction (deletion: the first ones in
    `order`; insertion: all but the first ones)."""
    n = shape[0] * shape[1]
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    masks = []
    for f in fractions:
        first = rank < int(np.rint(f * n))
        masks.append((first if mode == "deletion" else ~first).reshape(shape))
    return masks


def road_curves(
    predict: Predict,
    image: np.ndarray,
    orders: Mapping[str, np.ndarray],
    target: int,
    settings: FaithfulnessSettings,
    rng: np.random.Generator,
    decide_index: Callable[[np.ndarray], int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per order: ROAD deletion and insertion curves of p(target), their AUCs, and the
    class decided with the first `flip_fraction` of the order imputed. One predict call."""
    img = np.asarray(image, dtype=np.float32)
    shape = (img.shape[0], img.shape[1])
    fractions = np.linspace(0.0, 1.0, settings.road_steps + 1)
    batch: list[np.ndarray] = []
    spans: dict[tuple[str, str], slice] = {}
    for name, order in orders.items():
        for mode in ("deletion", "insertion"):
            start = len(batch)
            for removed in _removed_masks(order, shape, fractions, mode):
                batch.append(img if not removed.any() else noisy_linear_impute(img, removed, rng))
            spans[(name, mode)] = slice(start, len(batch))
        (flip_mask,) = _removed_masks(order, shape, np.array([settings.flip_fraction]),
                                      "deletion")
        spans[(name, "flip")] = slice(len(batch), len(batch) + 1)
        batch.append(noisy_linear_impute(img, flip_mask, rng))
    probs = np.asarray(predict(np.stack(batch)), dtype=np.float64)
    out: dict[str, dict[str, Any]] = {}
    for name in orders:
        deletion = probs[spans[(name, "deletion")], target]
        insertion = probs[spans[(name, "insertion")], target]
        flip_probs = probs[spans[(name, "flip")]][0]
        out[name] = {
            "deletion_curve": deletion.tolist(),
            "insertion_curve": insertion.tolist(),
            "deletion_auc": auc(deletion),
            "insertion_auc": auc(insertion),
            "class_after_removal": int(
                decide_index(flip_probs) if decide_index else np.argmax(flip_probs)
            ),
        }
    return out


def image_faithfulness(
    predict: Predict,
    image: np.ndarray,
    maps: Mapping[str, np.ndarray],
    target: int,
    settings: FaithfulnessSettings,
    rng: np.random.Generator,
    decide_index: Callable[[np.ndarray], int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Figures of every map of one image, plus the `random` and `uniform` references.

    `image` [H,W,C] is the preprocessed model input, `maps` [H,W] at that size,
    `target` the explained (decided) class. `decide_index(probabilities) -> class`
    decides as the service does (binary thresholds); argmax by default.
    """
    for reserved in REFERENCES:
        if reserved in maps:
            raise ValueError(f"{reserved!r} is a reference map's name")
    img = np.asarray(image, dtype=np.float32)
    shape = (img.shape[0], img.shape[1])
    uniform = np.ones(shape, dtype=np.float32)
    orders = {name: cam_order(m) for name, m in maps.items()}
    orders[RANDOM] = random_order(shape, settings.seed)
    orders[UNIFORM] = cam_order(uniform)
    road = road_curves(predict, img, orders, target, settings, rng, decide_index)
    # The blur figures go through the very function trainer.explain_eval calls.
    blur = causal_aucs(predict, img, {**maps, UNIFORM: uniform}, target,
                       steps=settings.blur_steps, baseline="blur", seed=settings.seed)
    out: dict[str, dict[str, Any]] = {}
    for name in orders:
        r = road[name]
        out[name] = {
            "deletion_auc": r["deletion_auc"],
            "insertion_auc": r["insertion_auc"],
            "deletion_auc_blur": blur[name]["deletion"],
            "insertion_auc_blur": blur[name]["insertion"],
            "class_flips": bool(r["class_after_removal"] != target),
            "deletion_curve": r["deletion_curve"],
            "insertion_curve": r["insertion_curve"],
        }
    return out
