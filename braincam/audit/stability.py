"""Stability: does the map stay put when the image barely changes?

Two perturbations a reader would not call a different scan: a left-right mirror
(the map of the mirrored image is mirrored back before comparing) and Gaussian noise
of NOISE_LEVEL times the image's own std. Per image and method: the Spearman rank
correlation with the original map (1 = same ranking of pixels). The explained class
stays the original's, so a mirror that tips the decision still asks the same question.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from braincam.audit.randomisation import spearman

NOISE_LEVEL = 0.1  # noise std as a share of each image's std

MapsFn = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]  # images, targets


def noisy(images: np.ndarray, rng: np.random.Generator, level: float = NOISE_LEVEL) -> np.ndarray:
    """[N,H,W,C] plus N(0, level * std of each image)."""
    std = images.std(axis=(1, 2, 3), keepdims=True)
    return (images + rng.standard_normal(images.shape) * level * std).astype(np.float32)


def stability(
    maps_fn: MapsFn,
    images: np.ndarray,
    targets: np.ndarray,
    original: dict[str, np.ndarray],
    rng: np.random.Generator,
    level: float = NOISE_LEVEL,
) -> dict[str, dict[str, list[float]]]:
    """{method: {"flip": [rho per image], "noise": [rho per image]}} (NaN: a flat map)."""
    flipped = maps_fn(np.ascontiguousarray(images[:, :, ::-1]), targets)
    noised = maps_fn(noisy(images, rng, level), targets)
    out: dict[str, dict[str, list[float]]] = {}
    for method, before in original.items():
        back = flipped[method][:, :, ::-1]
        out[method] = {
            "flip": [spearman(a, b) for a, b in zip(before, back, strict=True)],
            "noise": [spearman(a, b) for a, b in zip(before, noised[method], strict=True)],
        }
    return out
