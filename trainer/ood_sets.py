"""Out-of-distribution image sets for `trainer.ood_eval`, all from installed packages.

Every set is a list of uint8 images (gray HxW or RGB HxWx3) that then goes through
`braincam.preprocessing.preprocess`, as an upload would. Nothing is downloaded:
scikit-learn ships two photographs, scikit-image a few dozen images (photographs, a
face collection, a logo and text, a fundus photograph, histology, microscopy, a CT
phantom); the transformed-MRI and no-brain sets are made from the demo test split.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

Images = list[np.ndarray]

PHOTOGRAPHS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "stereo_motorcycle",
               "moon", "hubble_deep_field", "coins", "brick", "grass", "gravel")
GRAPHICS = ("logo", "text", "page", "horse", "checkerboard", "colorwheel")
MEDICAL = ("retina", "microaneurysms", "immunohistochemistry", "cell", "shepp_logan_phantom")


def _crops(img: np.ndarray) -> Images:
    """The whole image, its central square and its four quadrants: 6 views of one photo."""
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    views = [img, img[top : top + s, left : left + s]]
    views += [img[r : r + h // 2, c : c + w // 2] for r in (0, h // 2) for c in (0, w // 2)]
    return [np.ascontiguousarray(v) for v in views]


def _uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    x = img.astype(np.float64)
    x = (x - x.min()) / max(float(np.ptp(x)), 1e-12)
    return (x * 255).astype(np.uint8)


def _skimage(names: tuple[str, ...]) -> Images:
    import skimage.data

    out: Images = []
    for name in names:
        value = getattr(skimage.data, name)()
        img = _uint8(np.asarray(value[0] if isinstance(value, tuple) else value))
        if img.ndim == 3 and img.shape[2] == 4:
            img = img[:, :, :3]
        out += _crops(img)
    return out


def photographs() -> Images:
    from sklearn.datasets import load_sample_images

    out: Images = []
    for img in load_sample_images().images:
        out += _crops(np.asarray(img))
    return out + _skimage(PHOTOGRAPHS)


def faces(n: int = 100) -> Images:
    import skimage.data

    return [_uint8(f) for f in skimage.data.lfw_subset()[:n]]


def graphics() -> Images:
    return _skimage(GRAPHICS)


def medical() -> Images:
    return _skimage(MEDICAL)


def noise(size: int, n: int = 20, seed: int = 0) -> Images:
    rng = np.random.default_rng(seed)
    uniform = [rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(n)]
    gauss = [np.clip(rng.normal(128, 50, (size, size)), 0, 255).astype(np.uint8)
             for _ in range(n)]
    smooth = [cv2.GaussianBlur(u, (0, 0), 3) for u in uniform[: n // 2]]
    return uniform + gauss + [_uint8(s) for s in smooth]


def flat(size: int) -> Images:
    levels = [np.full((size, size), v, np.uint8) for v in range(0, 256, 32)] + [
        np.full((size, size), 255, np.uint8)
    ]
    ramp = np.linspace(0, 255, size, dtype=np.float64)
    ramps = [np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)),
             np.add.outer(ramp, ramp) / 2]
    return levels + [r.astype(np.uint8) for r in ramps]


def _blur(img: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), max(img.shape) / 25)


def _noised(img: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(img + rng.normal(0, 60, img.shape), 0, 255).astype(np.uint8)


def _corner(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    return np.ascontiguousarray(img[: h // 3, : w // 3])


TRANSFORMS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "MRI rotated 90°": lambda img, i: np.ascontiguousarray(np.rot90(img)),
    "MRI contrast-inverted": lambda img, i: 255 - img,
    "MRI heavily blurred": lambda img, i: _blur(img),
    "MRI heavily noised (σ = 60)": _noised,
    "MRI corner crop (top-left ninth)": lambda img, i: _corner(img),
}


def no_brain(scans: Images, brain_masks: list[np.ndarray | None]) -> Images:
    """Demo slices with the brain blanked out: the synthetic skull and scalp ring only."""
    out = []
    for img, mask in zip(scans, brain_masks, strict=True):
        if mask is None:
            continue
        blanked = img.copy()
        dilated = cv2.dilate((mask > 0).astype(np.uint8), np.ones((5, 5), np.uint8))
        blanked[dilated > 0] = 0
        out.append(blanked)
    return out


def brain_mask_for(data: Path, scan: Path) -> np.ndarray | None:
    """data/brain_masks/<split>/<class>/<name>.png of a demo scan, if the dataset has it."""
    rel = scan.relative_to(data)
    path = data / "brain_masks" / rel
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) if path.is_file() else None
