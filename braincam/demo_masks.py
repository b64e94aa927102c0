"""Ground-truth masks of the demo data, and the localisation figures read from them.

The demo-data builder (trainer/demo_data.py) writes, beside each image, its lesion
mask and its brain mask:

    ROOT/<split>/<class>/<name>.png             the image
    ROOT/masks/<split>/<class>/<name>.png       lesion mask (0/255; empty for notumor)
    ROOT/brain_masks/<split>/<class>/<name>.png brain mask

trainer.explain_eval and `braincam audit` both read them through this module, so the
figures they share come from one implementation (the service never imports trainer).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from braincam.decoding import load_image
from braincam.localization import (
    TOP_FRACTION,
    energy_in_mask,
    lesion_auroc,
    off_brain_mass,
    off_brain_peak,
    pointing_game,
    tolerance_px,
    top_fraction_iou,
)

log = logging.getLogger(__name__)

LESION_MASKS = "masks"
BRAIN_MASKS = "brain_masks"
# Figures that need a lesion (NaN on images without one).
LESION_METRICS = (
    "pointing_game", "pointing_game_strict", "energy_in_mask", "top15_iou", "lesion_auroc"
)


def mask_path(root: Path, kind: str, image: Path, split_dir: Path) -> Path:
    """Where the demo builder put `image`'s mask of `kind` (PNG, else the image's name)."""
    rel = image.relative_to(split_dir)
    base = root / kind / split_dir.name / rel.parent
    png = base / f"{rel.stem}.png"
    return png if png.is_file() or not (base / rel.name).is_file() else base / rel.name


@dataclass(frozen=True)
class DemoMaskPaths:
    lesion: Path
    brain: Path


def find_demo_masks(image: Path) -> DemoMaskPaths | None:
    """The mask paths of an image laid out as ROOT/<split>/<class>/<name>, when ROOT
    holds the demo builder's brain mask for it; None for any other image."""
    image = Path(image).resolve()
    if len(image.parents) < 3:
        return None
    split_dir, root = image.parents[1], image.parents[2]
    brain = mask_path(root, BRAIN_MASKS, image, split_dir)
    if not brain.is_file():
        return None
    return DemoMaskPaths(mask_path(root, LESION_MASKS, image, split_dir), brain)


def load_mask(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """Boolean mask at the image's [H,W]; None if the file is missing."""
    if not path.is_file():
        return None
    m = load_image(path)
    if m.ndim == 3:
        m = m[:, :, :3].max(axis=2)
    if m.shape != shape:
        log.warning("%s is %s, image is %s: resized (nearest)", path, m.shape, shape)
        m = cv2.resize(m, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return np.asarray(m > 127)


def mask_scores(
    cam: np.ndarray, lesion: np.ndarray | None, brain: np.ndarray | None
) -> dict[str, float]:
    """Localisation figures of one map at image resolution; NaN where a mask is missing
    (lesion figures also on an empty lesion mask)."""
    nan = float("nan")
    scores = dict.fromkeys(LESION_METRICS, nan)
    if lesion is not None and lesion.any():
        scores.update(
            pointing_game=pointing_game(cam, lesion, tolerance_px(cam.shape)),
            pointing_game_strict=pointing_game(cam, lesion, 0.0),
            energy_in_mask=energy_in_mask(cam, lesion),
            top15_iou=top_fraction_iou(cam, lesion, TOP_FRACTION),
            lesion_auroc=lesion_auroc(cam, lesion),
        )
    scores["off_brain_mass"] = off_brain_mass(cam, brain) if brain is not None else nan
    scores["off_brain_peak"] = off_brain_peak(cam, brain) if brain is not None else nan
    # An all-zero map explains nothing: its off-brain figures are NaN (left out of the
    # means), so the share of such maps is reported beside them.
    scores["empty_map"] = float(not cam.max() > 0)
    return scores
