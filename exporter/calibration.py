"""Real images for the exporter's gates (parity, INT8 calibration): no TensorFlow here,
so `python -m exporter quantize` runs without it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from braincam.datasets import IMAGE_SUFFIXES, canonical_class
from braincam.decoding import load_image
from braincam.errors import InputError
from braincam.preprocessing import Preprocessing, preprocess

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 32


class CalibrationError(ValueError):
    """No usable calibration images: the message says where it looked."""


def calibration_inputs(
    root: Path, spec: Preprocessing, limit: int = CALIBRATION_IMAGES
) -> np.ndarray:
    """Up to `limit` real images from a folder (a Kaggle split, class folders or flat),
    taken round-robin across class folders so every class is represented."""
    if not root.is_dir():
        raise CalibrationError(
            f"calibration directory {root} does not exist (pass --calibration DIR)"
        )
    testing = [p for p in root.iterdir() if p.is_dir() and p.name.lower() == "testing"]
    if testing:
        root = testing[0]
    groups = [
        sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        for d in sorted(root.iterdir())
        if d.is_dir() and canonical_class(d.name)
    ]
    if not groups:
        groups = [sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)]
    ordered = [g[i] for i in range(max(map(len, groups), default=0)) for g in groups if i < len(g)]
    images: list[np.ndarray] = []
    for path in ordered:
        if len(images) == limit:
            break
        try:
            images.append(preprocess(load_image(path), spec))
        except (InputError, OSError, ValueError):
            log.warning("calibration: skipped unreadable %s", path)
    if not images:
        raise CalibrationError(f"no readable images in calibration directory {root}")
    return np.stack(images)
