"""`python -m trainer.demo_data --out DIR`: the synthetic demo dataset (no download).

Writes the Kaggle Brain Tumor MRI Dataset layout, plus masks for the explanation checks:

    DIR/<split>/<class>/<name>.png              8-bit grayscale T1-like axial slice
    DIR/masks/<split>/<class>/<name>.png        lesion mask, 0/255 (all zero for notumor)
    DIR/brain_masks/<split>/<class>/<name>.png  intracranial tissue mask, 0/255
    DIR/dataset.json                            parameters, counts, template source/licence

Anatomy is real: an axial slice of the MNI ICBM152 2009 nonlinear symmetric T1 template
shipped in nilearn's wheel (a normal, skull-stripped brain), wrapped in a synthetic
skull/scalp ring. Every image gets its own slice level, pose, gain, gamma, bias field and
noise, all drawn from one class-independent distribution, so the only thing that tells
the classes apart is the lesion:

- glioma: intra-axial, ragged and heterogeneous (necrotic core with an enhancing rim, or
  mixed), centred in hemispheric white matter, with hazy T1-dark oedema. The lesion mask
  is the tumour core only (rim + necrosis), not the oedema: the oedema is a reaction of
  normal tissue and its edge is ill-defined by design.
- meningioma: extra-axial, homogeneous and bright, a dural-based cap on the inner skull
  surface (convexity) or on the falx, pushing the brain away (a thin CSF cleft remains).
- pituitary: a small round/ovoid, moderately bright midline mass at the sellar position
  (at higher slices it reads as suprasellar extension).

The brain mask is the brain tissue after the lesion's mass effect and after the global
pose, united with the lesion: an extra-axial tumour is intracranial, not "off brain".

Every image is deterministic from (seed, split, class, index) and independent of the
worker count. Synthetic data for demos and tests only: not patient data.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.resources
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np

CLASSES = ("glioma", "meningioma", "pituitary", "notumor")
SPLITS = ("Training", "Testing")
MASK_DIRS = ("masks", "brain_masks")

_PREFIX = {"Training": "Tr", "Testing": "Te"}
_SHORT = {"glioma": "gl", "meningioma": "me", "pituitary": "pi", "notumor": "no"}
_MARKER = ".demo_data"  # written first: lets a rebuild clear an interrupted build
_GENERATOR = "trainer.demo_data"
DATASET_JSON = "dataset.json"

TEMPLATE_DIR = "datasets/data"
T1_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
WM_FILE = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
TEMPLATE_LICENCE = (
    "MNI ICBM152 2009 nonlinear symmetric template (Fonov et al., NeuroImage 2011; "
    "Collins et al. 1999). Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging "
    "Centre, Montreal Neurological Institute, McGill University. Permission to use, copy, "
    "modify, and distribute this software and its documentation for any purpose and without "
    "fee is hereby granted, provided that the above copyright notice appear in all copies. "
    "The authors and McGill University make no representations about the suitability of "
    "this software for any purpose. It is provided 'as is' without express or implied "
    "warranty."
)

# Geometry, in template millimetres (1 canvas pixel = 1 mm).
CANVAS = 256
_ORIGIN = (14, 30)  # canvas (row, col) of template pixel (0, 0): brain centred on the canvas
MID_COL = 98 + _ORIGIN[1]  # the interhemispheric plane (template x = 98)
SELLA_ROW = 100 + _ORIGIN[0]  # sella/suprasellar cistern, anterior-central midline
# Axial levels from the sella turcica (MNI z ~ -26 mm) to the bodies of the lateral
# ventricles (MNI z ~ +24 mm); one distribution for every class.
Z_RANGE = (46, 96)
BRAIN_WIDTH_MM = 140.0
FOV_MM = 232.0  # the output image spans this many mm at scale 1
MIN_SIZE, MAX_SIZE = 32, 1024
PARALLEL_MIN_IMAGES = 200  # below this, worker start-up (template load) costs more than it saves

# Canvas intensities (template units: 1.0 = 255 in the template; white matter ~ 0.86).
# Lesion levels are multiples of white matter, as on contrast-enhanced T1: meningioma
# brightest, pituitary moderately bright, glioma rim bright around a dark core. Each
# image's brain mean is renormalised afterwards, so they never shift global brightness.
_WM = 0.86
_CSF = 0.17


# --- template -------------------------------------------------------------------------


def template_path(name: str = T1_FILE) -> Path:
    return Path(str(importlib.resources.files("nilearn") / TEMPLATE_DIR / name))


@lru_cache(maxsize=1)
def _volumes() -> tuple[np.ndarray, np.ndarray]:
    """(T1, WM probability) as uint8 volumes: loaded once per process."""
    import nibabel as nib

    t1, wm = (
        np.asarray(nib.Nifti1Image.from_filename(template_path(name)).dataobj, dtype=np.uint8)
        for name in (T1_FILE, WM_FILE)
    )
    return t1, wm


@dataclass(frozen=True)
class Slice:
    """One axial level on the canvas: anterior up, 1 px = 1 mm."""

    t1: np.ndarray  # float32, 0..1
    wm: np.ndarray  # float32 white-matter probability
    brain: np.ndarray  # bool, template > 0
    hull_dist: np.ndarray  # float32 mm outside the brain's convex hull (0 inside)
    inner_dist: np.ndarray  # float32 mm inside the brain mask (0 outside)
    centre: tuple[float, float]  # (row, col) of the hull's centroid


def _to_canvas(img: np.ndarray) -> np.ndarray:
    out = np.zeros((CANVAS, CANVAS), np.float32)
    r0, c0 = _ORIGIN
    out[r0 : r0 + img.shape[0], c0 : c0 + img.shape[1]] = img
    return out


@cache
def get_slice(z: int) -> Slice:
    t1v, wmv = _volumes()
    t1 = _to_canvas(np.rot90(t1v[:, :, z]).astype(np.float32) / 255.0)
    wm = _to_canvas(np.rot90(wmv[:, :, z]).astype(np.float32) / 255.0)
    brain = t1 > 0
    points = cv2.findNonZero(brain.astype(np.uint8))
    hull = np.zeros((CANVAS, CANVAS), np.uint8)
    cv2.fillConvexPoly(hull, cv2.convexHull(points), 1)
    hull_dist = cv2.distanceTransform(1 - hull, cv2.DIST_L2, 5)
    inner_dist = cv2.distanceTransform(brain.astype(np.uint8), cv2.DIST_L2, 5)
    m = cv2.moments(hull, binaryImage=True)
    centre = (m["m01"] / m["m00"], m["m10"] / m["m00"])
    return Slice(t1, wm, brain, hull_dist, inner_dist, centre)


# --- global (class-independent) appearance --------------------------------------------


@dataclass(frozen=True)
class Globals:
    z: int
    angle: float  # degrees
    scale: float
    shift: tuple[float, float]  # output px (x, y)
    csf_gap: float  # mm between the brain's hull and the inner table
    ring: tuple[float, ...]  # layer thicknesses, mm (see _ring_profile)
    ring_levels: tuple[float, ...]
    bias: tuple[float, ...]
    gamma: float
    target_mean: float  # mean of the brain region in the final 0..255 image
    noise: float  # Rician sigma, 0..255 units


def draw_globals(rng: np.random.Generator, size: int) -> Globals:
    """Every pose/appearance parameter; the distribution never depends on the class."""
    ring = (
        rng.uniform(1.3, 2.3),  # inner table
        rng.uniform(1.5, 3.5),  # diploe
        rng.uniform(1.0, 2.0),  # outer table
        rng.uniform(1.0, 2.0),  # galea / muscle
        rng.uniform(3.0, 6.0),  # subcutaneous fat
        rng.uniform(0.8, 1.5),  # skin
    )
    levels = (
        rng.uniform(0.02, 0.06),  # cortical bone: no signal
        rng.uniform(0.30, 0.55),  # fatty marrow
        rng.uniform(0.25, 0.40),  # galea / muscle
        rng.uniform(0.85, 1.05),  # scalp fat: the bright rim
        rng.uniform(0.35, 0.50),  # skin
    )
    amp = rng.uniform(0.0, 0.25)
    return Globals(
        z=int(rng.integers(Z_RANGE[0], Z_RANGE[1] + 1)),
        angle=float(rng.uniform(-15.0, 15.0)),
        scale=float(rng.uniform(0.9, 1.1)),
        shift=(float(rng.uniform(-0.04, 0.04) * size), float(rng.uniform(-0.04, 0.04) * size)),
        csf_gap=float(rng.uniform(1.5, 3.0)),
        ring=tuple(float(t) for t in ring),
        ring_levels=tuple(float(v) for v in levels),
        bias=tuple(float(c) for c in amp * rng.uniform(-1.0, 1.0, 5)),
        gamma=float(math.exp(rng.uniform(math.log(0.8), math.log(1.25)))),
        target_mean=float(rng.uniform(85.0, 125.0)),
        noise=float(rng.uniform(1.0, 6.0)),
    )


def _ring_profile(g: Globals) -> tuple[np.ndarray, np.ndarray]:
    """Intensity against mm outside the inner table: bone, marrow, bone, galea, fat, skin."""
    bone, marrow, galea, fat, skin = g.ring_levels
    levels = (bone, marrow, bone, galea, fat, skin)
    xs, ys, edge, ramp = [0.0], [_CSF], 0.0, 0.35  # soft 0.7 mm transitions
    for thickness, level in zip(g.ring, levels, strict=True):
        xs += [edge + ramp, edge + thickness - ramp]
        ys += [level, level]
        edge += thickness
    xs.append(edge + ramp)
    ys.append(0.0)
    return np.asarray(xs, np.float32), np.asarray(ys, np.float32)


def compose_head(
    t1: np.ndarray, brain: np.ndarray, sl: Slice, g: Globals
) -> tuple[np.ndarray, np.ndarray]:
    """Canvas image (brain + CSF + skull/scalp ring) and the intracranial mask."""
    outside = sl.hull_dist - g.csf_gap  # mm outside the inner table
    xs, ys = _ring_profile(g)
    ring = np.interp(outside, xs, ys).astype(np.float32)
    intracranial = outside <= 0
    img = np.where(brain, t1, np.where(intracranial, np.float32(_CSF), ring))
    return img.astype(np.float32), intracranial


def bias_field(g: Globals, shape: tuple[int, int]) -> np.ndarray:
    """Smooth multiplicative field (low-order polynomial), as from coil sensitivity."""
    v, u = np.mgrid[-1 : 1 : shape[0] * 1j, -1 : 1 : shape[1] * 1j].astype(np.float32)
    c = g.bias
    field = 1 + c[0] * u + c[1] * v + c[2] * u * v + c[3] * (u * u - 1 / 3) + c[4] * (v * v - 1 / 3)
    return np.clip(field, 0.6, 1.4).astype(np.float32)


# --- lesions --------------------------------------------------------------------------


@dataclass
class Lesion:
    """A lesion on the canvas, drawn over the (pushed) brain."""

    alpha: np.ndarray  # float32 0..1 coverage; the lesion mask is alpha >= 0.5
    value: np.ndarray  # float32 tumour intensity where alpha > 0
    push_centre: tuple[float, float] | None = None  # (row, col) of the mass effect
    push: float = 0.0  # mm of tissue displaced at the centre
    push_side: int = 0  # falx: only the hemisphere on this side (+1 right, -1 left) moves
    oedema: np.ndarray | None = None  # float32 0..1 multiplicative darkening of tissue


def smooth_noise(rng: np.random.Generator, cell: float, shape: tuple[int, int]) -> np.ndarray:
    """Unit-variance random field with features ~`cell` px wide."""
    gh, gw = int(shape[0] / cell) + 3, int(shape[1] / cell) + 3
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    big = cv2.resize(grid, (int(gw * cell), int(gh * cell)), interpolation=cv2.INTER_CUBIC)
    field = big[: shape[0], : shape[1]]
    return ((field - field.mean()) / (field.std() + 1e-6)).astype(np.float32)


def _polar(
    centre: tuple[float, float], aspect: float, angle: float
) -> tuple[np.ndarray, np.ndarray]:
    """Elliptical radius (mm, area-preserving) and angle of every canvas pixel."""
    rows, cols = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32)
    dy, dx = rows - centre[0], cols - centre[1]
    ca, sa = math.cos(angle), math.sin(angle)
    u, v = ca * dx + sa * dy, -sa * dx + ca * dy
    k = math.sqrt(aspect)
    return np.hypot(u / k, v * k), np.arctan2(v, u)


def _wobble(rng: np.random.Generator, theta: np.ndarray, amp: float, kmax: int) -> np.ndarray:
    """1 + a sum of low angular harmonics: a lumpy outline."""
    out = np.ones_like(theta)
    for k in range(2, kmax + 1):
        out += rng.uniform(0, amp / math.sqrt(k)) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return out


def _soft(inside: np.ndarray, edge_mm: float) -> np.ndarray:
    """0..1 coverage from a signed mm distance (positive inside); 0.5 on the boundary."""
    return np.clip(0.5 + inside / edge_mm, 0.0, 1.0).astype(np.float32)


def _pick(rng: np.random.Generator, candidates: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero(candidates)
    i = int(rng.integers(len(rows)))
    return float(rows[i]) + rng.uniform(-0.5, 0.5), float(cols[i]) + rng.uniform(-0.5, 0.5)


def glioma(rng: np.random.Generator, sl: Slice, z: int) -> Lesion:
    radius = rng.uniform(0.11, 0.18) * BRAIN_WIDTH_MM
    rows, cols = np.mgrid[0:CANVAS, 0:CANVAS]
    hemispheric = np.abs(cols - MID_COL) > 12
    # Supratentorial: no cerebellum/brainstem (posterior fossa) at the lower levels.
    supratentorial = (rows < _ORIGIN[0] + 135) | (z >= 70)
    cand = (sl.wm > 0.6) & hemispheric & supratentorial & (sl.inner_dist > 0.7 * radius)
    if not cand.any():
        cand = (sl.wm > 0.3) & hemispheric & (sl.inner_dist > 0.4 * radius)
    if not cand.any():
        cand = sl.inner_dist >= 0.8 * sl.inner_dist.max()
    centre = _pick(rng, cand)
    rho, theta = _polar(centre, rng.uniform(0.7, 1.4), rng.uniform(0, np.pi))
    boundary = radius * _wobble(rng, theta, 0.2, 6)
    ragged = 0.1 * radius * smooth_noise(rng, 4.0, rho.shape)
    # Intra-axial: the outline stops at the brain surface.
    inside = np.minimum(boundary - rho + ragged, sl.inner_dist - 1.0)
    q = rho / boundary  # 0 at the centre, 1 at the outline
    blotch = smooth_noise(rng, 0.3 * radius, rho.shape)
    fine = smooth_noise(rng, 5.0, rho.shape)
    if rng.random() < 0.6:  # irregular enhancing rim around a necrotic core
        core_edge = rng.uniform(0.45, 0.7) + 0.12 * blotch
        core = np.clip((core_edge - q) / 0.08 + 0.5, 0, 1)
        necrosis = rng.uniform(0.12, 0.22) + 0.02 * fine
        enhancing = rng.uniform(1.45, 1.75) * _WM + 0.04 * fine
        value = core * necrosis + (1 - core) * enhancing
    else:  # mixed: heterogeneous solid enhancement with dark cystic/necrotic pockets
        cyst = np.clip((-blotch - rng.uniform(0.0, 0.5)) / 0.3, 0, 1)
        solid = rng.uniform(1.2, 1.5) * _WM + 0.08 * blotch + 0.04 * fine
        value = cyst * rng.uniform(0.15, 0.3) + (1 - cyst) * solid
    oedema = _oedema(rng, sl, rho, boundary, radius)
    return Lesion(
        alpha=_soft(inside, 1.0),
        value=value.astype(np.float32),
        push_centre=centre,
        push=rng.uniform(0.2, 0.5) * radius,
        oedema=oedema,
    )


def _oedema(
    rng: np.random.Generator, sl: Slice, rho: np.ndarray, boundary: np.ndarray, radius: float
) -> np.ndarray:
    """Vasogenic oedema: a hazy T1-dark halo, reaching further along white matter."""
    spread = rng.uniform(1.6, 2.3) * boundary * (0.75 + 0.35 * sl.wm)
    haze = (spread - rho + 0.2 * radius * smooth_noise(rng, 0.4 * radius, rho.shape)) / (
        0.6 * radius
    )
    depth = rng.uniform(0.4, 0.55) * (0.4 + 0.6 * sl.wm)
    return (np.clip(haze, 0, 1) * depth).astype(np.float32)


def _convexity_site(
    rng: np.random.Generator, sl: Slice, gap: float
) -> tuple[tuple[float, float], tuple[float, float]]:
    """A point on the inner skull surface and the outward normal there."""
    angle = rng.uniform(0, 2 * np.pi)
    normal = (math.sin(angle), math.cos(angle))  # (row, col)
    r = np.arange(0.0, CANVAS / 2, 0.5)
    rows = np.clip(sl.centre[0] + r * normal[0], 0, CANVAS - 1).astype(int)
    cols = np.clip(sl.centre[1] + r * normal[1], 0, CANVAS - 1).astype(int)
    # The skull is convex around the centre: the ray leaves it exactly once.
    exit_r = r[int(np.argmax(sl.hull_dist[rows, cols] > gap))]
    return (sl.centre[0] + exit_r * normal[0], sl.centre[1] + exit_r * normal[1]), normal


def _falx_site(rng: np.random.Generator, sl: Slice, z: int) -> tuple[float, float]:
    """A point on the falx: midline, with brain on both sides, away from the posterior
    fossa at the low levels."""
    lo, hi = np.nonzero(sl.brain.any(axis=1))[0][[0, -1]]
    span = hi - lo
    rows = np.arange(CANVAS)
    both = sl.brain[:, MID_COL - 8] & sl.brain[:, MID_COL + 8]
    front = rows < lo + 0.35 * span
    back = (rows > hi - 0.35 * span) & (z >= 70)
    cand = np.nonzero(both & (front | back))[0]
    if len(cand) == 0:
        cand = np.nonzero(front)[0]
    return float(rng.choice(cand)), float(MID_COL)


def meningioma(rng: np.random.Generator, sl: Slice, z: int, gap: float) -> Lesion:
    radius = rng.uniform(0.13, 0.18) * BRAIN_WIDTH_MM
    beyond = rng.uniform(0.0, 0.1) * radius  # how far the sphere's centre sits in the dura
    cleft = rng.uniform(1.0, 2.0)  # CSF cleft between tumour and the pushed brain
    side = 0
    if rng.random() < 0.7:  # convexity: the inner table of the skull
        base, normal = _convexity_site(rng, sl, gap)
        centre = (base[0] + beyond * normal[0], base[1] + beyond * normal[1])
        to_brain = beyond + gap
    else:  # falx: the base is the midline, the dome bulges into one hemisphere
        side = 1 if rng.random() < 0.5 else -1
        base = _falx_site(rng, sl, z)
        centre = (base[0], base[1] - side * beyond)
        to_brain = beyond + 1.0
    rho, theta = _polar(centre, rng.uniform(0.85, 1.2), rng.uniform(0, np.pi))
    inside = radius * _wobble(rng, theta, 0.07, 4) - rho
    alpha = _soft(inside, 0.8)
    # Extra-axial: clipped by the inner table (and by the falx).
    alpha = np.minimum(alpha, _soft(gap - sl.hull_dist, 0.8))
    if side:
        cols = np.arange(CANVAS, dtype=np.float32)[None, :]
        alpha = np.minimum(alpha, _soft(side * (cols - MID_COL) - 0.5, 0.8))
    value = rng.uniform(1.55, 1.85) * _WM + 0.025 * smooth_noise(rng, 3.0, rho.shape)
    push = math.sqrt(max((radius + cleft) ** 2 - to_brain**2, 0.0))
    return Lesion(alpha=alpha, value=value, push_centre=centre, push=push, push_side=side)


def pituitary(rng: np.random.Generator, sl: Slice) -> Lesion:
    radius = rng.uniform(0.07, 0.095) * BRAIN_WIDTH_MM
    centre = (SELLA_ROW + rng.uniform(-3, 3), MID_COL + rng.uniform(-1.5, 1.5))
    rho, theta = _polar(centre, rng.uniform(0.75, 1.25), rng.uniform(-0.3, 0.3))
    inside = radius * _wobble(rng, theta, 0.05, 3) - rho
    value = rng.uniform(1.4, 1.6) * _WM + 0.06 * smooth_noise(rng, 3.0, rho.shape)
    return Lesion(
        alpha=_soft(inside, 0.8),
        value=value,
        push_centre=centre,
        push=rng.uniform(0.4, 0.7) * radius,
    )


def make_lesion(cls: str, rng: np.random.Generator, sl: Slice, g: Globals) -> Lesion | None:
    if cls == "glioma":
        return glioma(rng, sl, g.z)
    if cls == "meningioma":
        return meningioma(rng, sl, g.z, g.csf_gap)
    if cls == "pituitary":
        return pituitary(rng, sl)
    return None


def mass_effect(lesion: Lesion) -> tuple[np.ndarray, np.ndarray] | None:
    """Remap grids that push tissue radially away from the lesion (cv2.remap convention).

    Tissue at radius r moves to sqrt(r^2 + push^2) (an inflating balloon: area is
    conserved), tapered to nothing a few radii away so the skull never moves.
    """
    if lesion.push_centre is None or lesion.push <= 0:
        return None
    a = lesion.push
    rows, cols = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32)
    dy, dx = rows - lesion.push_centre[0], cols - lesion.push_centre[1]
    r_out = np.maximum(np.hypot(dx, dy), 1e-3)
    r_src = np.sqrt(np.maximum(r_out * r_out - a * a, 0.0))
    taper = np.clip(1 - (r_out - a) / (3 * a + 10), 0, 1) ** 2
    shrink = np.where(r_out <= a, 0.0, 1 - (r_out - r_src) * taper / r_out)
    if lesion.push_side:  # falx: the other hemisphere stays put
        shrink = np.where(lesion.push_side * (cols - MID_COL) > 0, shrink, 1.0)
    map_x = (lesion.push_centre[1] + dx * shrink).astype(np.float32)
    map_y = (lesion.push_centre[0] + dy * shrink).astype(np.float32)
    return map_x, map_y


# --- rendering ------------------------------------------------------------------------


def _affine(g: Globals, size: int) -> np.ndarray:
    """Canvas mm -> output px: rotate/scale about the canvas centre, then shift."""
    k = g.scale * size / FOV_MM
    t = math.radians(g.angle)
    a = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]]) * k
    centre_in = np.array([CANVAS / 2, CANVAS / 2])
    centre_out = np.array([size / 2 + g.shift[0], size / 2 + g.shift[1]])
    return np.hstack([a, (centre_out - a @ centre_in)[:, None]]).astype(np.float32)


def _warp(img: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    return cv2.warpAffine(
        img, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
    )


def _canvas(
    cls: str, g: Globals, lesion_rng: np.random.Generator, with_lesion: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, lesion coverage, brain coverage) on the canvas, before the global pose."""
    sl = get_slice(g.z)
    lesion = make_lesion(cls, lesion_rng, sl, g) if with_lesion else None
    t1: np.ndarray = sl.t1
    brain: np.ndarray = sl.brain.astype(np.float32)
    grids = mass_effect(lesion) if lesion is not None else None
    if grids is not None:
        t1 = cv2.remap(t1, *grids, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        brain = cv2.remap(brain, *grids, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    head, intracranial = compose_head(t1, brain >= 0.5, sl, g)
    img: np.ndarray = head
    tissue = (brain >= 0.5) & intracranial
    coverage: np.ndarray = np.zeros_like(img)
    if lesion is not None:
        if lesion.oedema is not None:
            img = np.where(tissue, img * (1 - lesion.oedema), img)
        img = img * (1 - lesion.alpha) + lesion.value * lesion.alpha
        coverage = lesion.alpha
    brain_cov = np.maximum(tissue.astype(np.float32), (coverage >= 0.5).astype(np.float32))
    return img.astype(np.float32), coverage, brain_cov


def render_sample(
    rng_seed: Sequence[int], cls: str, size: int = 150, with_lesion: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image: (uint8 image, uint8 0/255 lesion mask, uint8 0/255 brain mask).

    `rng_seed` (e.g. (seed, split_id, class_id, index)) seeds two independent streams,
    one for the global appearance and one for the lesion, so `with_lesion=False` gives the
    very same image without its lesion (up to the brain-mean renormalisation).
    """
    if cls not in CLASSES:
        raise ValueError(f"unknown class {cls!r}; expected one of {', '.join(CLASSES)}")
    global_rng = np.random.default_rng([*rng_seed, 0])
    g = draw_globals(global_rng, size)
    lesion_rng = np.random.default_rng([*rng_seed, 1])
    img, lesion_cov, brain_cov = _canvas(cls, g, lesion_rng, with_lesion)
    return _acquire(img, lesion_cov, brain_cov, g, size, global_rng)


def _acquire(
    img: np.ndarray,
    lesion_cov: np.ndarray,
    brain_cov: np.ndarray,
    g: Globals,
    size: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canvas -> final image and masks: bias field, pose, gamma, gain, noise."""
    m = _affine(g, size)
    img = img * bias_field(g, img.shape)
    sigma = 0.45 * FOV_MM / (g.scale * size)  # anti-aliasing before the downsampling warp
    if sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    out = np.maximum(_warp(img, m, size), 0.0) ** g.gamma
    lesion = _warp(lesion_cov, m, size) >= 0.5
    brain = (_warp(brain_cov, m, size) >= 0.5) | lesion
    # Same brain mean for every class: brightness must not give the class away.
    out *= g.target_mean / max(float(out[brain].mean()) if brain.any() else 1.0, 1e-3)
    n1, n2 = rng.standard_normal((2, size, size), dtype=np.float32) * g.noise
    out = np.sqrt((out + n1) ** 2 + n2**2)  # Rician magnitude noise
    image = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return image, lesion.astype(np.uint8) * 255, brain.astype(np.uint8) * 255


# --- dataset --------------------------------------------------------------------------


def file_name(split: str, cls: str, index: int) -> str:
    return f"{_PREFIX[split]}-{_SHORT[cls]}_{index:04d}.png"


Job = tuple[int, int, int]  # (split id, class id, index)


def _render_jobs(out: str, seed: int, size: int, jobs: list[Job]) -> int:
    root = Path(out)
    for split_id, class_id, index in jobs:
        split, cls = SPLITS[split_id], CLASSES[class_id]
        image, lesion, brain = render_sample((seed, split_id, class_id, index), cls, size)
        name = file_name(split, cls, index)
        for sub, arr in ((root, image), (root / "masks", lesion), (root / "brain_masks", brain)):
            if not cv2.imwrite(str(sub / split / cls / name), arr):
                raise OSError(f"could not write {sub / split / cls / name}")
    return len(jobs)


def validate(per_class: int, test_per_class: int, size: int, seed: int,
             workers: int | None) -> list[str]:
    problems = []
    if per_class < 1:
        problems.append(f"--per-class must be at least 1 (got {per_class})")
    if test_per_class < 1:
        problems.append(f"--test-per-class must be at least 1 (got {test_per_class})")
    if not MIN_SIZE <= size <= MAX_SIZE:
        problems.append(f"--size must be between {MIN_SIZE} and {MAX_SIZE} (got {size})")
    if seed < 0:
        problems.append(f"--seed must be non-negative (got {seed})")
    if workers is not None and workers < 1:
        problems.append(f"--workers must be at least 1 (got {workers})")
    return problems


def _prepare(out: Path) -> None:
    """Create `out`, clearing a previous demo build; refuse anything else non-empty."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        ours = (out / _MARKER).is_file() or _is_demo_json(out / DATASET_JSON)
        if not ours:
            raise ValueError(f"{out} is not empty and holds no demo dataset; "
                             "choose an empty or new directory")
        for name in (*SPLITS, *MASK_DIRS):
            shutil.rmtree(out / name, ignore_errors=True)
        (out / DATASET_JSON).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARKER).write_text("generated by trainer.demo_data\n")
    for root in (out, out / "masks", out / "brain_masks"):
        for split in SPLITS:
            for cls in CLASSES:
                (root / split / cls).mkdir(parents=True, exist_ok=True)


def _is_demo_json(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("generator") == _GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


def _chunks(jobs: list[Job], n: int) -> list[list[Job]]:
    return [jobs[i : i + n] for i in range(0, len(jobs), n)]


def _run(out: Path, seed: int, size: int, jobs: list[Job], workers: int) -> None:
    # Spawn, not fork: a parent that already runs threads (e.g. a deep-learning runtime)
    # stays safe.
    if workers <= 1 or len(jobs) < PARALLEL_MIN_IMAGES:
        _render_jobs(str(out), seed, size, jobs)
        return
    chunks = _chunks(jobs, max(10, len(jobs) // (workers * 8)))
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(_render_jobs, str(out), seed, size, c) for c in chunks]
        for f in futures:
            f.result()


def _metadata(per_class: int, test_per_class: int, size: int, seed: int) -> dict[str, Any]:
    counts = {
        "Training": dict.fromkeys(CLASSES, per_class),
        "Testing": dict.fromkeys(CLASSES, test_per_class),
    }
    return {
        "name": "braincam synthetic demo dataset",
        "description": "Synthetic brain-tumour MRI: axial slices of a normal-brain template "
        "with simulated glioma, meningioma and pituitary lesions, lesion and brain masks.",
        "generator": _GENERATOR,
        "version": 1,
        "synthetic": True,
        "note": "Synthetic lesions on a normal-brain template, for demos and tests only: "
        "not patient data, not for clinical use.",
        "seed": seed,
        "size": size,
        "per_class": per_class,
        "test_per_class": test_per_class,
        "classes": list(CLASSES),
        "counts": counts,
        "total": 4 * (per_class + test_per_class),
        "layout": {
            "images": "<split>/<class>/<name>.png (8-bit grayscale)",
            "lesion_masks": "masks/<split>/<class>/<name>.png (0/255; empty for notumor; "
            "glioma: tumour core without oedema)",
            "brain_masks": "brain_masks/<split>/<class>/<name>.png (0/255; brain tissue "
            "after mass effect and pose, united with the lesion)",
        },
        "augmentation": {
            "slice_z_voxels": list(Z_RANGE),
            "rotation_deg": [-15, 15],
            "scale": [0.9, 1.1],
            "shift_fraction": [-0.04, 0.04],
            "gamma": [0.8, 1.25],
            "brain_mean": [85, 125],
            "bias_amplitude": [0.0, 0.25],
            "rician_sigma": [1.0, 6.0],
            "field_of_view_mm": FOV_MM,
        },
        "template": {
            "file": f"nilearn/{TEMPLATE_DIR}/{T1_FILE}",
            "white_matter": f"nilearn/{TEMPLATE_DIR}/{WM_FILE}",
            "package": f"nilearn {_version('nilearn')}",
            "licence": TEMPLATE_LICENCE,
        },
    }


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def read_demo_meta(data: Path) -> dict[str, Any] | None:
    """dataset.json of a demo dataset built by this module, else None."""
    try:
        meta = json.loads((data / DATASET_JSON).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("generator") == _GENERATOR else None


def lesion_free_twin(meta: dict[str, Any], image: Path) -> np.ndarray | None:
    """The demo image `image` re-rendered without its lesion, or None if it is not one.

    `meta` is its dataset's `read_demo_meta`. Same seed streams, so pose, anatomy,
    bias field and noise are identical: the counterfactual "this very scan, healthy"
    for checking what a model decides on.
    """
    split, cls = image.parent.parent.name, image.parent.name
    if split not in SPLITS or cls not in CLASSES:
        return None
    if image.name != file_name(split, cls, index := _index_of(image.name)):
        return None
    seed = (int(meta["seed"]), SPLITS.index(split), CLASSES.index(cls), index)
    twin, _, _ = render_sample(seed, cls, int(meta["size"]), with_lesion=False)
    return twin


def _index_of(name: str) -> int:
    try:
        return int(Path(name).stem.rsplit("_", 1)[-1])
    except ValueError:
        return -1


def build_demo_dataset(
    out: Path,
    per_class: int = 300,
    test_per_class: int = 75,
    size: int = 150,
    seed: int = 0,
    workers: int | None = None,
) -> dict[str, Any]:
    """Write the demo dataset to `out` and return its summary (dataset.json + timing)."""
    out = Path(out)
    problems = validate(per_class, test_per_class, size, seed, workers)
    if problems:
        raise ValueError("; ".join(problems))
    n_workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    started = time.perf_counter()
    _prepare(out)
    jobs = [
        (s, c, i)
        for s, n in enumerate((per_class, test_per_class))
        for c in range(len(CLASSES))
        for i in range(n)
    ]
    _run(out, seed, size, jobs, n_workers)
    meta = _metadata(per_class, test_per_class, size, seed)
    (out / DATASET_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    (out / _MARKER).unlink(missing_ok=True)
    return {**meta, "out": str(out), "workers": n_workers,
            "seconds": round(time.perf_counter() - started, 2)}


# --- CLI ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m trainer.demo_data",
        description="Build the synthetic brain-MRI demo dataset (Kaggle layout, with lesion "
        "and brain masks) from the MNI152 template shipped with nilearn. No download.",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory (new or empty)")
    p.add_argument("--per-class", type=int, default=300, help="training images per class")
    p.add_argument("--test-per-class", type=int, default=75, help="test images per class")
    p.add_argument("--size", type=int, default=150, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--workers", type=int, help="processes (default: min(2, CPUs))")
    args = p.parse_args(argv)
    problems = validate(args.per_class, args.test_per_class, args.size, args.seed, args.workers)
    if problems:
        p.error("; ".join(problems))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = build_demo_dataset(
            args.out, args.per_class, args.test_per_class, args.size, args.seed, args.workers
        )
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    n = summary["total"]
    print(f"demo dataset: {n} images ({args.size}x{args.size}) in {summary['out']}")
    for split, counts in summary["counts"].items():
        print(f"  {split:<8} " + "  ".join(f"{cls}={n}" for cls, n in counts.items()))
    secs = summary["seconds"]
    print(f"  built in {secs:.1f} s with {summary['workers']} worker(s) "
          f"({n / max(secs, 1e-9):.0f} images/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
