"""Where the head is in a slice, and how much of an explanation lies outside it.

A heatmap whose mass lies in the background or on the skull is a warning sign: the
model may be reading something other than the brain (a shortcut: the field of view,
a scanner's padding, the scalp). This module finds the head in the image the overlay
is drawn on (the decoded upload, `DecodedImage.pixels`: /explain resizes the map to
that image's size), and measures the map's mass outside it and on its rim.

The mask (`head_mask`), on a copy shrunk to at most `WORK_SIDE` px on its long side
(area averaging: it is cheap, and it averages the background's noise away):

1. threshold at `THRESHOLD_FRACTION` of the 99th percentile: an MRI's background is
   air (noise only), the head's tissues are far brighter; a fraction of a high
   percentile keeps the dark tissues (CSF, muscle, marrow) that Otsu's two-class
   split would cut away with the background, and ignores a few hot pixels;
2. a closing (a disk of radius `CLOSE_FRACTION` of the long side, ~4 px of 64)
   bridges the skull's dark cortical bone between the brain and the bright scalp,
   and holes are filled;
3. the largest connected component is the head (specks of noise, labels, a second
   small object are dropped), its holes filled again.

The rim (`head_rim`) is the band of the mask within `RIM_FRACTION` of the head's
equivalent diameter (the diameter of a disk of its area) from its edge: about the
scalp and skull (~8-15 mm of a ~180 mm head). Edges on the image's border are not
the head's edge (a head cut by the field of view), so the band does not follow them.

The shares (`heat_outside_head`, `heat_on_rim`) are fractions of the map's mass
(sum of its values in [0,1]) after area-resizing the map onto the mask's grid: the
map as the overlay shows it, measured where the mask was computed. A flat (all-zero)
map has no mass and no location: its shares are None, as when no head is found.

The warning (`HEAD_WARNING`): above `OUTSIDE_THRESHOLD` (0.5) of the mass outside
the head, the explanation "lies mostly outside the head". It is not raised for a map
of the no-finding class (`notumor`, a binary model's negative): evidence *for* the
absence of a tumour has no expected place, and a class-discriminative map of it is
not meant to point at anything (the demo model's notumor maps put 70 % of their mass
outside the head on average, its tumour maps 4-16 %: benchmarks/bench_head.py); its
share is still reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# The long side of the grid the mask is computed on (px).
WORK_SIDE = 64
# Foreground: brighter than this fraction of the image's 99th percentile.
THRESHOLD_FRACTION = 0.1
# The closing disk's radius, as a fraction of the long side of the working grid.
CLOSE_FRACTION = 0.06
# The rim's width, as a fraction of the head's equivalent diameter.
RIM_FRACTION = 0.06
# Above this share of the map's mass outside the head, the answer warns.
OUTSIDE_THRESHOLD = 0.5
# The warning's machine code (as in the JSON `warnings` and the DICOM SR).
HEAD_WARNING = "heat_outside_head"


def _gray(image: np.ndarray) -> np.ndarray:
    """HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA), uint8 or any real type -> HxW, uint8
    kept as it is (no full-size copy: the mask needs only a small grid of it)."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    elif arr.ndim == 3 and arr.shape[2] in (3, 4):
        if arr.dtype != np.uint8:
            arr = arr.astype(np.float32)
        # Luma of the colour channels (an MRI is grey anyway).
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY if arr.shape[2] == 3 else cv2.COLOR_RGBA2GRAY)
    if arr.ndim != 2:
        raise ValueError(f"image must be HxW or HxWxC, got shape {np.shape(image)}")
    return arr if arr.dtype in (np.uint8, np.float32) else arr.astype(np.float32)


def work_size(shape: tuple[int, ...], side: int = WORK_SIDE) -> tuple[int, int]:
    """(width, height) of the working grid for an image of shape (H, W, ...)."""
    h, w = int(shape[0]), int(shape[1])
    scale = min(1.0, side / max(h, w))
    return max(1, round(w * scale)), max(1, round(h * scale))


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """uint8 0/1 mask with every region not reachable from the border filled."""
    padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    cv2.floodFill(padded, None, (0, 0), 2)  # the background reachable from outside
    return np.asarray(padded[1:-1, 1:-1] != 2, dtype=np.uint8)


def head_mask(image: np.ndarray, side: int = WORK_SIDE) -> np.ndarray:
    """The head, bool [h,w] on the working grid (`work_size`); all False if none."""
    gray = _gray(image)
    width, height = work_size(gray.shape, side)
    small = cv2.resize(gray, (width, height), interpolation=cv2.INTER_AREA).astype(np.float32)
    top = float(np.percentile(small, 99))
    if not np.isfinite(top) or top <= float(small.min()):
        return np.zeros((height, width), dtype=bool)  # a flat image has no head
    fg = (small > THRESHOLD_FRACTION * top).astype(np.uint8)
    # Padded before closing so that a head touching the border is not shrunk there.
    pad = max(1, round(CLOSE_FRACTION * max(width, height)))
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pad - 1, 2 * pad - 1))
    padded = cv2.copyMakeBorder(fg, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, disk)[pad:-pad, pad:-pad]
    fg = _fill_holes(np.ascontiguousarray(closed, dtype=np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if n < 2:
        return np.zeros((height, width), dtype=bool)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return _fill_holes((labels == largest).astype(np.uint8)).astype(bool)


def head_rim(mask: np.ndarray) -> np.ndarray:
    """The outer band of the head (the skull's), bool like `mask`; see the module doc."""
    mask = np.asarray(mask, dtype=bool)
    area = int(mask.sum())
    if area == 0:
        return mask.copy()
    width = RIM_FRACTION * 2.0 * np.sqrt(area / np.pi)
    # OpenCV counts pixels beyond the image as foreground: a border-cut edge is no rim.
    inside = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
    return np.asarray(mask & (inside <= max(width, 1.0)), dtype=bool)


def _on_grid(cam: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The map [H,W] area-resized to `shape` (h, w): mass per region is kept. Non-finite
    values count as 0 (their grid cell does: the full-size map is never copied)."""
    values = np.asarray(cam, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"a map must be [H,W], got shape {values.shape}")
    if values.shape != tuple(shape[:2]):
        values = np.asarray(
            cv2.resize(values, (shape[1], shape[0]), interpolation=cv2.INTER_AREA), np.float32
        )
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    return np.maximum(values, np.float32(0.0))


def _share(grid: np.ndarray, region: np.ndarray, inside: bool) -> float | None:
    """Share of the grid's mass in (or outside) the region; None without mass."""
    total = float(grid.sum())
    if total <= 0.0:
        return None  # a flat map: no mass, no location
    part = float(grid[region].sum())
    share = part / total if inside else 1.0 - part / total
    return round(min(max(share, 0.0), 1.0), 4)


def heat_outside_head(cam: np.ndarray, mask: np.ndarray) -> float | None:
    """Share of the map's mass outside the head, in [0,1]; None for a flat map or when
    no head was found. `cam` [H,W] is the map at the image's size (or any size: it is
    area-resized onto the mask's grid)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return None
    return _share(_on_grid(cam, mask.shape), mask, inside=False)


def heat_on_rim(cam: np.ndarray, rim: np.ndarray) -> float | None:
    """Share of the map's mass on the head's rim (`head_rim`), in [0,1]; None for a
    flat map or when no head was found."""
    rim = np.asarray(rim, dtype=bool)
    if not rim.any():
        return None
    return _share(_on_grid(cam, rim.shape), rim, inside=True)


@dataclass(frozen=True)
class HeadCheck:
    """Where one explanation's mass lies, and the warning it earns."""

    heat_outside_head: float | None
    heat_on_rim: float | None
    meaningful: bool  # false: the map explains the no-finding class (no warning)

    @property
    def outside(self) -> bool:
        """True when the explanation lies mostly outside the head (the warning)."""
        return (
            self.meaningful
            and self.heat_outside_head is not None
            and self.heat_outside_head > OUTSIDE_THRESHOLD
        )

    def warning(self) -> str | None:
        """The warning's text, or None."""
        if not self.outside:
            return None
        return (
            f"the explanation lies mostly outside the head ({self.heat_outside_head:.0%} of "
            f"the heatmap's mass, more than {OUTSIDE_THRESHOLD:.0%}): the class score it "
            "explains may rest on the background rather than on the brain"
        )

    def as_dict(self) -> dict[str, float | None]:
        return {"heat_outside_head": self.heat_outside_head, "heat_on_rim": self.heat_on_rim}


def check_head(image: np.ndarray, cam: np.ndarray, meaningful: bool = True) -> HeadCheck:
    """The head check of one map [H,W] over the image it is drawn on."""
    mask = head_mask(image)
    if not mask.any():
        return HeadCheck(None, None, meaningful)
    rim = head_rim(mask)
    grid = _on_grid(cam, mask.shape)  # once: the map's resize is most of the cost
    return HeadCheck(
        _share(grid, mask, inside=False), _share(grid, rim, inside=True), meaningful
    )
