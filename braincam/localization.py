"""Explanation-quality metrics: does a CAM point at the lesion, and is it faithful?

Localisation metrics take one CAM [H,W] in [0,1] at the image's resolution and
boolean masks of the same size; they return floats (NaN where a metric is
undefined, e.g. an empty lesion mask, so callers can average with nanmean).

Faithfulness metrics (deletion / insertion, Petsiuk et al. 2018, "RISE") perturb
the preprocessed model input in CAM order and watch the target probability;
they take a `predict_fn(batch [N,H,W,C] float32) -> probabilities [N,K]` callback
and the CAM at the model's resolution. All steps of one image go to the callback
in one batch.

Numpy only: the service image does not need anything else to run these.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import numpy as np

PredictFn = Callable[[np.ndarray], np.ndarray]
Baseline = Literal["mean", "blur", "zero"]
Mode = Literal["deletion", "insertion"]

# Pointing-game tolerance as a fraction of the image's shorter side. The original
# pointing game (Zhang et al. 2016) allows 15 px on PASCAL VOC images, whose shorter
# side is ~375 px: 4 %. A fraction keeps the rule the same at any upload size:
# 6 px at 150 px, 20 px at 512 px. It is also about half a cell of a 10x10 feature
# map, the CAM's real resolution, so it forgives upsampling, not a wrong region.
POINTING_TOLERANCE = 0.04
TOP_FRACTION = 0.15
# The peak region of a CAM: at least half its maximum (the half-maximum contour).
PEAK_LEVEL = 0.5
CAUSAL_STEPS = 16
# The default baseline for deleted pixels is a heavy blur of the image, sigma a
# fraction of its side (7.5 px at 150 px): it flattens lesion-scale contrast but keeps
# the brain-shaped intensity, so perturbed images stay closer to what the model was
# trained on than constant-filled holes (for random-order deletion, salt-and-pepper
# noise). A lesion much larger than sigma keeps some contrast: compare with "mean".
BLUR_SIGMA = 0.05


def _check(cam: np.ndarray, *masks: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    c = np.asarray(cam, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"a CAM must be [H,W], got shape {c.shape}")
    out = []
    for m in masks:
        b = np.asarray(m).astype(bool)
        if b.shape != c.shape:
            raise ValueError(f"mask shape {b.shape} does not match CAM shape {c.shape}")
        out.append(b)
    return np.nan_to_num(np.clip(c, 0.0, None)), out


def tolerance_px(shape: tuple[int, ...], fraction: float = POINTING_TOLERANCE) -> float:
    """The default pointing-game tolerance in pixels for an image of this [H,W] shape."""
    return fraction * float(min(shape[0], shape[1]))


def pointing_game(cam: np.ndarray, lesion: np.ndarray, tolerance: float = 0.0) -> float:
    """1.0 if the CAM's maximum lies within `tolerance` px of the lesion, else 0.0.

    `tolerance` = 0 is the strict game (the maximum must be a lesion pixel); a
    positive radius is equivalent to dilating the mask with a disc. Ties go to the
    first maximum in row-major order. An all-zero CAM points nowhere: 0.0. NaN if
    the mask is empty.
    """
    c, (m,) = _check(cam, lesion)
    if not m.any():
        return float("nan")
    if c.max() <= 0:
        return 0.0
    y, x = np.unravel_index(int(np.argmax(c)), c.shape)
    if m[y, x]:
        return 1.0
    if tolerance <= 0:
        return 0.0
    ys, xs = np.nonzero(m)
    d2 = (ys - y) ** 2 + (xs - x) ** 2
    return float(d2.min() <= tolerance * tolerance)


def energy_in_mask(cam: np.ndarray, lesion: np.ndarray) -> float:
    """Share of the CAM's total mass inside the lesion: sum(CAM in mask) / sum(CAM).

    0.0 for an all-zero CAM, NaN for an empty mask. Compare with the mask's area
    share, which is what a uniform CAM would score.
    """
    c, (m,) = _check(cam, lesion)
    if not m.any():
        return float("nan")
    total = c.sum()
    return float(c[m].sum() / total) if total > 0 else 0.0


def top_fraction_iou(cam: np.ndarray, lesion: np.ndarray, fraction: float = TOP_FRACTION) -> float:
    """IoU of the lesion with the `fraction` of pixels where the CAM is highest.

    The region is the round(fraction * H*W) highest pixels, but only those with a
    positive CAM: zero-valued pixels carry no evidence, and picking some of them to
    fill the quota would make the score depend on tie-breaking. For a CAM equal to
    the mask the score is therefore 1 when the lesion fits in the quota and
    quota / area when it does not. 0.0 for an all-zero CAM, NaN for an empty mask.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    c, (m,) = _check(cam, lesion)
    if not m.any():
        return float("nan")
    flat = c.ravel()
    k = min(max(1, round(fraction * flat.size)), int(np.count_nonzero(flat > 0)))
    if k == 0:
        return 0.0
    top = np.zeros(flat.size, dtype=bool)
    top[np.argpartition(-flat, k - 1)[:k]] = True
    mask = m.ravel()
    inter = np.count_nonzero(top & mask)
    return float(inter / np.count_nonzero(top | mask))


def lesion_auroc(cam: np.ndarray, lesion: np.ndarray) -> float:
    """ROC AUC of the map as a lesion-pixel detector: the chance that a random lesion
    pixel scores higher than a random pixel outside it (ties count half).

    Unlike energy-in-mask and off-brain mass, which share out the map's *mass*, it
    depends only on the order of the values: a change of contrast (squaring the
    map, a gamma) cannot move it. 1 when every lesion pixel outranks every other,
    0.5 for a constant map, NaN for an empty or full mask.
    """
    c, (m,) = _check(cam, lesion)
    flat, inside = c.ravel().astype(np.float64), m.ravel()
    n_in = int(np.count_nonzero(inside))
    n_out = inside.size - n_in
    if n_in == 0 or n_out == 0:
        return float("nan")
    # Mann-Whitney U from average ranks: tied values (a ReLU's zeros) share a rank.
    _, which, counts = np.unique(flat, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[which]
    u = ranks[inside].sum() - n_in * (n_in + 1) / 2.0
    return float(u / (n_in * n_out))


def off_brain_mass(cam: np.ndarray, brain: np.ndarray) -> float:
    """Share of the CAM's mass outside the brain: the shortcut check (skull, text, borders).

    NaN for an all-zero CAM: it points nowhere, so it neither passes nor fails the
    check (a 0.0 would reward a method for explaining nothing).
    """
    c, (m,) = _check(cam, brain)
    total = c.sum()
    return float(c[~m].sum() / total) if total > 0 else float("nan")


def off_brain_peak(cam: np.ndarray, brain: np.ndarray, level: float = PEAK_LEVEL) -> float:
    """Share of the CAM's peak region (CAM >= level * max) that lies outside the brain.

    Off-brain *mass* also counts a low, flat floor spread over a large background;
    this asks only where the explanation is hot: is the peak on skull or background?
    NaN for an all-zero CAM, as for the mass.
    """
    c, (m,) = _check(cam, brain)
    peak_value = c.max()
    if peak_value <= 0:
        return float("nan")
    peak = c >= level * peak_value
    return float((peak & ~m).sum() / peak.sum())


# --- deletion / insertion ------------------------------------------------------------


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of [H,W,C] with reflected borders (numpy only)."""
    if sigma <= 0:
        return image.copy()
    radius = max(1, int(np.ceil(3 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    out = image.astype(np.float64)
    for axis in (0, 1):
        r = min(radius, out.shape[axis] - 1)  # reflect padding needs r < size
        k = kernel[radius - r : radius + r + 1]
        k = k / k.sum()
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r, r)
        padded = np.pad(out, pad, mode="reflect")
        windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * r + 1, axis=axis)
        out = windows @ k
    return out.astype(np.float32)


def baseline_image(image: np.ndarray, kind: Baseline | np.ndarray = "blur") -> np.ndarray:
    """What deleted pixels become: 'mean' (per-channel image mean), 'blur' (a heavy
    Gaussian blur, BLUR_SIGMA of the side), 'zero' (0 in model-input units), or an array."""
    img = np.asarray(image, dtype=np.float32)
    if isinstance(kind, np.ndarray):
        if kind.shape != img.shape:
            raise ValueError(f"baseline shape {kind.shape} does not match image {img.shape}")
        return kind.astype(np.float32)
    if kind == "mean":
        return np.broadcast_to(img.mean(axis=(0, 1), keepdims=True), img.shape).astype(np.float32)
    if kind == "blur":
        return _gaussian_blur(img, BLUR_SIGMA * max(img.shape[0], img.shape[1]))
    if kind == "zero":
        return np.zeros_like(img)
    raise ValueError(f"unknown baseline {kind!r}; use 'mean', 'blur', 'zero' or an array")


def cam_order(cam: np.ndarray) -> np.ndarray:
    """Flat pixel indices, most salient first (stable: ties in row-major order)."""
    c = np.nan_to_num(np.asarray(cam, dtype=np.float64))
    if c.ndim != 2:
        raise ValueError(f"a CAM must be [H,W], got shape {c.shape}")
    return np.argsort(-c.ravel(), kind="stable")


def random_order(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A reproducible random pixel order for an [H,W] image: the chance baseline."""
    return np.random.default_rng(seed).permutation(int(shape[0]) * int(shape[1]))


def _image_hwc(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3:
        raise ValueError(f"the image must be [H,W,C], got shape {img.shape}")
    return img


def perturbation_batch(
    image: np.ndarray,
    order: np.ndarray,
    baseline: np.ndarray,
    steps: int = CAUSAL_STEPS,
    mode: Mode = "deletion",
) -> np.ndarray:
    """[steps+1,H,W,C]: step i has the first i/steps of `order` replaced.

    Deletion replaces those pixels of the image with the baseline; insertion starts
    from the baseline and puts them back.
    """
    img = _image_hwc(image)
    h, w, _ = img.shape
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if order.shape != (h * w,):
        raise ValueError(f"order must list all {h * w} pixels, got shape {order.shape}")
    rank = np.empty(h * w, dtype=np.int64)
    rank[order] = np.arange(h * w)
    counts = np.round(np.linspace(0, h * w, steps + 1)).astype(np.int64)
    changed = (rank[None, :] < counts[:, None]).reshape(steps + 1, h, w, 1)
    first, second = (baseline, img) if mode == "deletion" else (img, baseline)
    return np.where(changed, first[None], second[None]).astype(np.float32)


def auc(curve: np.ndarray) -> float:
    """Trapezoid area under a curve sampled at equal steps on [0, 1]."""
    y = np.asarray(curve, dtype=np.float64)
    if y.size < 2:
        raise ValueError("a curve needs at least two points")
    return float((y[:-1] + y[1:]).sum() / (2.0 * (y.size - 1)))


def _target_curves(
    predict_fn: PredictFn, batches: list[np.ndarray], class_index: int
) -> list[np.ndarray]:
    """Run all batches in one predict_fn call; split the target-class probability back."""
    probs = np.asarray(predict_fn(np.concatenate(batches)), dtype=np.float64)
    target = probs[:, class_index]
    bounds = np.cumsum([len(b) for b in batches])[:-1]
    return np.split(target, bounds)


def deletion_auc(
    predict_fn: PredictFn,
    image: np.ndarray,
    cam: np.ndarray,
    class_index: int,
    steps: int = CAUSAL_STEPS,
    baseline: Baseline | np.ndarray = "blur",
) -> float:
    """Delete pixels in CAM order (most salient first): area under p(class). Lower = better."""
    img = _image_hwc(image)
    base = baseline_image(img, baseline)
    batch = perturbation_batch(img, cam_order(cam), base, steps, "deletion")
    return auc(_target_curves(predict_fn, [batch], class_index)[0])


def insertion_auc(
    predict_fn: PredictFn,
    image: np.ndarray,
    cam: np.ndarray,
    class_index: int,
    steps: int = CAUSAL_STEPS,
    baseline: Baseline | np.ndarray = "blur",
) -> float:
    """Insert pixels in CAM order into the baseline: area under p(class). Higher = better."""
    img = _image_hwc(image)
    base = baseline_image(img, baseline)
    batch = perturbation_batch(img, cam_order(cam), base, steps, "insertion")
    return auc(_target_curves(predict_fn, [batch], class_index)[0])


def _random_auc(predict_fn: PredictFn, image: np.ndarray, class_index: int, steps: int,
                baseline: Baseline | np.ndarray, seed: int, mode: Mode) -> float:
    img = _image_hwc(image)
    order = random_order(img.shape, seed)
    batch = perturbation_batch(img, order, baseline_image(img, baseline), steps, mode)
    return auc(_target_curves(predict_fn, [batch], class_index)[0])


def random_deletion_auc(
    predict_fn: PredictFn,
    image: np.ndarray,
    class_index: int,
    steps: int = CAUSAL_STEPS,
    baseline: Baseline | np.ndarray = "blur",
    seed: int = 0,
) -> float:
    """Deletion AUC for a random pixel order: the chance level deletion_auc should beat."""
    return _random_auc(predict_fn, image, class_index, steps, baseline, seed, "deletion")


def random_insertion_auc(
    predict_fn: PredictFn,
    image: np.ndarray,
    class_index: int,
    steps: int = CAUSAL_STEPS,
    baseline: Baseline | np.ndarray = "blur",
    seed: int = 0,
) -> float:
    """Insertion AUC for a random pixel order."""
    return _random_auc(predict_fn, image, class_index, steps, baseline, seed, "insertion")


def causal_aucs(
    predict_fn: PredictFn,
    image: np.ndarray,
    cams: Mapping[str, np.ndarray],
    class_index: int,
    steps: int = CAUSAL_STEPS,
    baseline: Baseline | np.ndarray = "blur",
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Deletion and insertion AUCs for several CAMs of one image plus the random order,
    all in a single predict_fn call of (len(cams) + 1) * 2 * (steps + 1) images.

    Returns {name: {"deletion": auc, "insertion": auc}} with the extra name "random".
    """
    if "random" in cams:
        raise ValueError("'random' is reserved for the random-order baseline")
    img = _image_hwc(image)
    base = baseline_image(img, baseline)
    orders = {name: cam_order(cam) for name, cam in cams.items()}
    orders["random"] = random_order(img.shape, seed)
    batches = [
        perturbation_batch(img, order, base, steps, mode)
        for order in orders.values()
        for mode in ("deletion", "insertion")
    ]
    curves = iter(_target_curves(predict_fn, batches, class_index))
    return {
        name: {"deletion": auc(next(curves)), "insertion": auc(next(curves))} for name in orders
    }
