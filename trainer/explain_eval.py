"""Score the CAM methods of an exported model against lesion and brain masks.

    python -m trainer.explain_eval --model-dir models/NAME --data DIR \\
        [--methods gradcam,gradcam++,...] [--split Testing] [--limit N] [--out DIR]

Everything goes through the code the service runs: `OnnxModel` (both ONNX graphs),
`decoding.load_image`, `preprocessing.preprocess` with the model's own spec, and
`braincam.cam`. One gradcam.onnx run per batch yields the activations and gradients
that every CAM method needs. The explained class is the true class of each image.

Masks follow the demo-data layout:
    DIR/<split>/<class>/<name>.png             images
    DIR/masks/<split>/<class>/<name>.png       lesion masks (0/255; empty for notumor)
    DIR/brain_masks/<split>/<class>/<name>.png brain masks

Populations: pointing game, energy-in-mask, top-15 % IoU, deletion and insertion
use the tumour images (a non-empty lesion mask); off-brain mass uses every image
with a brain mask and a map that is not all zero (the share of all-zero maps is
reported beside it). Per-class rows show notumor's deletion/insertion too.

Writes explain_report.json, explain_report.md and explain_grid.png to --out
(default: the model directory) and prints the overall table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import cv2
import numpy as np

from braincam.cam import METHODS, compute_cam, normalize, resize_cam
from braincam.datasets import MULTICLASS_LABELS, Task, find_split_dir, scan_split, task_label
from braincam.decision import decide
from braincam.decoding import load_image
from braincam.demo_masks import LESION_METRICS, load_mask, mask_scores
from braincam.demo_masks import mask_path as _mask_path
from braincam.errors import InputError, InvalidParameter
from braincam.explainers import PIXEL_METHODS, make_explainer, uses_attribution
from braincam.inference import DEFAULT_PROVIDERS, GradcamOutput, OnnxModel
from braincam.localization import (
    CAUSAL_STEPS,
    POINTING_TOLERANCE,
    TOP_FRACTION,
    Baseline,
    causal_aucs,
)
from braincam.overlay import blend, colorize, to_rgb
from braincam.preprocessing import preprocess
from trainer.demo_data import lesion_free_twin, read_demo_meta

log = logging.getLogger("trainer.explain_eval")

REPORT_JSON = "explain_report.json"
REPORT_MD = "explain_report.md"
GRID_PNG = "explain_grid.png"

# Goals an explanation should meet on the demo data (see the report's goal check).
GOALS = {
    "pointing_game": (">=", 0.9),
    "energy_in_mask": (">=", 0.5),
    "deletion_ratio": ("<=", 0.5),
    "off_brain_mass": ("<=", 0.10),
}

# metric key -> column title, in table order
METRICS: dict[str, str] = {
    "pointing_game": "pointing",
    "pointing_game_strict": "pointing strict",
    "energy_in_mask": "energy in mask",
    "top15_iou": "top-15% IoU",
    "lesion_auroc": "lesion AUROC",
    "deletion_auc": "deletion AUC",
    "random_deletion_auc": "random del. AUC",
    "deletion_ratio": "deletion ratio",
    "insertion_auc": "insertion AUC",
    "random_insertion_auc": "random ins. AUC",
    "off_brain_mass": "off-brain mass",
    "off_brain_mass_tumour": "off-brain mass, tumour images",
    "off_brain_peak": "off-brain peak",
    "empty_map": "empty maps",
}
_DERIVED = ("deletion_ratio", "off_brain_mass_tumour")  # computed from the per-image keys
_PER_IMAGE = [k for k in METRICS if k not in _DERIVED]
_LESION_ONLY = LESION_METRICS
_CAUSAL = ("deletion_auc", "random_deletion_auc", "insertion_auc", "random_insertion_auc")
GRID_CELL = 180  # px, longer side of each grid thumbnail

# Reference "CAMs" scored beside the methods, to read their figures against:
#   uniform     - a flat map: chance level (energy-in-mask = the lesion's area share,
#                 off-brain mass = the image's off-brain area share);
#   lesion_mask - the ground-truth lesion mask, area-pooled to the explained layer's
#                 h x w and upsampled like a CAM: the best any CAM of that layer can
#                 score, i.e. the ceiling its resolution sets. Tumour images only.
UNIFORM = "uniform"
LESION_ORACLE = "lesion_mask"
REFERENCES = (UNIFORM, LESION_ORACLE)
REFERENCE_TITLES = {UNIFORM: "ref: uniform map (chance)",
                    LESION_ORACLE: "ref: lesion mask at layer grid (ceiling)"}


@dataclass
class Sample:
    path: Path
    cls: str  # 4-class folder name (also for binary models)
    target: int  # true label index in the model's labels
    lesion_path: Path
    brain_path: Path


@dataclass
class GridRow:
    cls: str
    name: str
    prob: float
    cells: list[np.ndarray] = field(default_factory=list)


def collect_samples(
    data: Path, split: str, task: Task, labels: Sequence[str], limit: int | None
) -> list[Sample]:
    """The split's images (at most `limit` per class) with their mask paths."""
    split_dir = find_split_dir(data, split)
    listing = scan_split(split_dir, task)
    per_class: dict[str, int] = {}
    samples = []
    for path, cls in zip(listing.paths, listing.classes, strict=True):
        if limit is not None and per_class.get(cls, 0) >= limit:
            continue
        per_class[cls] = per_class.get(cls, 0) + 1
        samples.append(
            Sample(
                path=path,
                cls=cls,
                target=list(labels).index(task_label(cls, task)),
                lesion_path=_mask_path(data, "masks", path, split_dir),
                brain_path=_mask_path(data, "brain_masks", path, split_dir),
            )
        )
    return samples


def _chunked(model: OnnxModel, max_batch: int) -> Any:
    """predict over [N,H,W,C] images (the pixel-deletion code's layout) in chunks,
    transposed to [N,C,H,W] for a model that takes NCHW."""
    nchw = model.spec.preprocessing.layout == "nchw"

    def predict(batch: np.ndarray) -> np.ndarray:
        if nchw:
            batch = batch.transpose(0, 3, 1, 2)
        return np.concatenate(
            [
                model.predict(np.ascontiguousarray(batch[i : i + max_batch]))
                for i in range(0, len(batch), max_batch)
            ]
        )

    return predict


# One implementation for both tools (`braincam audit` scores demo masks the same way).
image_scores = mask_scores


def oracle_cam(lesion: np.ndarray, layer_hw: tuple[int, int],
               model_hw: tuple[int, int]) -> np.ndarray:
    """The lesion mask as the explained layer would see it, at the model's input size.

    Area-pooled to the layer's grid, then through the same normalise + bilinear
    resize as every CAM method, so the two differ only in where the mass sits.
    """
    pooled = cv2.resize(lesion.astype(np.float32), (layer_hw[1], layer_hw[0]),
                        interpolation=cv2.INTER_AREA)
    return resize_cam(normalize(pooled[None])[0], (model_hw[1], model_hw[0]))


# The shortcut check by counterfactual, beside off-brain CAM mass: on demo data the
# generator re-renders each tumour image without its lesion, all else identical (pose,
# anatomy, skull, bias field, noise). A model that decides on the lesion calls the
# twin healthy; one that leans on anything else (skull, background, brightness,
# slice level) keeps its tumour label.


def twin_summary(rows: list[dict[str, Any]], labels: Sequence[str],
                 healthy: int) -> dict[str, Any]:
    """Share of lesion-free twins called healthy, p(true) before/after, per class."""

    def summary(group: list[dict[str, Any]]) -> dict[str, Any]:
        n = len(group)
        return {
            "n_images": n,
            "twin_called_healthy": (
                sum(r["twin_predicted"] == healthy for r in group) / n if n else None
            ),
            "mean_p_true": float(np.mean([r["p_true"] for r in group])) if n else None,
            "mean_p_true_twin": float(np.mean([r["p_true_twin"] for r in group])) if n else None,
            "twin_predicted": {lab: sum(r["twin_predicted"] == j for r in group)
                               for j, lab in enumerate(labels)},
        }

    classes = list(dict.fromkeys(r["class"] for r in rows))
    return {**summary(rows), "per_class": {c: summary([r for r in rows if r["class"] == c])
                                           for c in classes}}


def _cell(rgb: np.ndarray, mask: np.ndarray | None, colour: tuple[int, int, int]) -> np.ndarray:
    """A grid thumbnail (GRID_CELL px long side) with the mask outlined at thumbnail scale."""
    h, w = rgb.shape[:2]
    s = GRID_CELL / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    out = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    if mask is not None and mask.any():
        small = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, colour, 1, cv2.LINE_AA)
    return out


def split_entry(entry: str) -> tuple[str, str | None]:
    """'hirescam@block3_relu' -> ('hirescam', 'block3_relu'); 'gradcam' -> ('gradcam', None)."""
    method, _, layer = entry.partition("@")
    return method, layer or None


def method_cams(model: OnnxModel, x: np.ndarray, out: GradcamOutput, targets: np.ndarray,
                methods: list[str], size: tuple[int, int], samples: int | None = None
                ) -> dict[str, np.ndarray]:
    """Each METHOD[@LAYER] entry's maps at `size`, as /explain computes them: from the
    Grad-CAM run `out` at its own layer, else from attribution.onnx
    (braincam/explainers.py: other layers, fused LayerCAM, SmoothGrad, IG)."""
    cams = {}
    for entry in methods:
        method, layer = split_entry(entry)
        if uses_attribution(method, layer, model):
            n = samples if method in PIXEL_METHODS else None
            cams[entry] = make_explainer(method, layer, n, model)(model, x, targets, size)
        else:
            cams[entry] = compute_cam(method, out.activations, out.gradients, size=size)
    return cams


def evaluate(
    model: OnnxModel,
    samples: list[Sample],
    methods: list[str],
    batch_size: int = 16,
    steps: int = CAUSAL_STEPS,
    baseline: str = "blur",
    seed: int = 0,
    grid_per_class: int = 2,
    predict_batch: int = 64,
    data: Path | None = None,
    noise_samples: int | None = None,
) -> tuple[list[dict[str, Any]], list[GridRow], dict[str, Any]]:
    """Per image x method metric rows, the grid rows, and run facts (accuracy, skips)."""
    spec = model.spec
    pre = spec.preprocessing
    predict = _chunked(model, predict_batch)
    rows: list[dict[str, Any]] = []
    grid: list[GridRow] = []
    grid_count: dict[str, int] = {}
    skipped: list[str] = []
    correct = 0
    n_done = 0
    layer_hw = (0, 0)
    twins: list[dict[str, Any]] = []
    demo_meta = read_demo_meta(data) if data is not None else None
    for start in range(0, len(samples), batch_size):
        chunk, pixels = [], []
        for s in samples[start : start + batch_size]:
            try:
                pixels.append(load_image(s.path))
                chunk.append(s)
            except (InputError, OSError) as exc:
                log.warning("skipped %s: %s", s.path, exc)
                skipped.append(str(s.path))
        if not chunk:
            continue
        x = np.stack([preprocess(p, pre) for p in pixels])
        out = model.gradcam(x, [s.target for s in chunk])
        layer_hw = (int(out.activations.shape[1]), int(out.activations.shape[2]))
        cams = method_cams(model, x, out, np.array([s.target for s in chunk]), methods,
                           (pre.width, pre.height), noise_samples)
        if pre.layout == "nchw":  # the deletion/insertion code perturbs [H,W,C] pixels
            x = x.transpose(0, 2, 3, 1)
        for i, (s, img) in enumerate(zip(chunk, pixels, strict=True)):
            shape = (int(img.shape[0]), int(img.shape[1]))
            lesion = load_mask(s.lesion_path, shape)
            brain = load_mask(s.brain_path, shape)
            has_lesion = lesion is not None and bool(lesion.any())
            if lesion is None and s.cls != "notumor":
                log.warning("no lesion mask for %s (looked for %s)", s.path, s.lesion_path)
            if brain is None:
                log.warning("no brain mask for %s (looked for %s)", s.path, s.brain_path)
            # decide(): binary models use their tuned threshold, as the service does
            correct += int(decide(out.probabilities[i], spec).class_index == s.target)
            n_done += 1
            twin = lesion_free_twin(demo_meta, s.path) if demo_meta and has_lesion else None
            if twin is not None:
                pr = model.predict(preprocess(twin, pre)[None])[0]
                twins.append({"class": s.cls, "twin_predicted": decide(pr, spec).class_index,
                              "p_true": float(out.probabilities[i][s.target]),
                              "p_true_twin": float(pr[s.target])})
            model_cams = {m: cams[m][i] for m in methods}
            if lesion is not None and has_lesion:
                model_lesion = cv2.resize(lesion.astype(np.uint8), (pre.width, pre.height),
                                          interpolation=cv2.INTER_NEAREST)
                model_cams[LESION_ORACLE] = oracle_cam(model_lesion, layer_hw,
                                                       (pre.height, pre.width))
            causal = causal_aucs(
                predict,
                x[i],
                model_cams,
                s.target,
                steps=steps,
                baseline=cast(Baseline, baseline),
                seed=seed,
            )
            image_cams = {m: resize_cam(c, (shape[1], shape[0])) for m, c in model_cams.items()}
            image_cams[UNIFORM] = np.ones(shape, dtype=np.float32)
            causal[UNIFORM] = dict.fromkeys(("deletion", "insertion"), float("nan"))
            for m, cam in image_cams.items():
                rows.append(
                    {
                        "path": str(s.path),
                        "class": s.cls,
                        "method": m,
                        "has_lesion": has_lesion,
                        **image_scores(cam, lesion if has_lesion else None, brain),
                        "deletion_auc": causal[m]["deletion"],
                        "insertion_auc": causal[m]["insertion"],
                        "random_deletion_auc": causal["random"]["deletion"],
                        "random_insertion_auc": causal["random"]["insertion"],
                    }
                )
            if has_lesion and grid_count.get(s.cls, 0) < grid_per_class:
                grid_count[s.cls] = grid_count.get(s.cls, 0) + 1
                rgb = to_rgb(img)
                row = GridRow(s.cls, s.path.name, float(out.probabilities[i][s.target]))
                row.cells.append(_cell(rgb, None, (0, 0, 0)))
                row.cells.append(_cell(rgb, lesion, (0, 255, 0)))
                for m in methods:
                    overlay = blend(rgb, colorize(image_cams[m], "jet"), 0.4)
                    row.cells.append(_cell(overlay, lesion, (255, 255, 255)))
                grid.append(row)
        log.info("explained %d/%d images", min(start + batch_size, len(samples)), len(samples))
    facts = {
        "layer_grid": f"{layer_hw[0]}x{layer_hw[1]}" if n_done else None,
        "n_images": n_done,
        "accuracy": correct / n_done if n_done else float("nan"),
        "lesion_free_twins": (
            twin_summary(twins, spec.labels, spec.labels.index(task_label("notumor", spec.task)))
            if twins else None
        ),
        "skipped": skipped,
    }
    return rows, grid, facts


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over a group of per-image rows: lesion metrics and deletion/insertion over
    the tumour images, off-brain mass over all."""
    lesion_rows = [r for r in rows if r["has_lesion"]]
    out: dict[str, Any] = {}
    for key in _PER_IMAGE:
        if key in _LESION_ONLY:
            src = lesion_rows
        elif key in _CAUSAL:
            src = lesion_rows or rows  # a notumor-only group scores its own images
        else:
            src = rows
        out[key] = _mean([r[key] for r in src])
    # Ratio of means, not mean of ratios: a near-zero random AUC on one image would
    # otherwise dominate.
    rnd = out["random_deletion_auc"]
    valid = rnd > 0 and not math.isnan(out["deletion_auc"])  # NaN compares False
    out["deletion_ratio"] = out["deletion_auc"] / rnd if valid else float("nan")
    # "No tumour" maps have no lesion to point at: the tumour images' share on its own.
    out["off_brain_mass_tumour"] = _mean([r["off_brain_mass"] for r in lesion_rows])
    out["n_images"] = len({r["path"] for r in rows})
    out["n_lesion_images"] = len({r["path"] for r in lesion_rows})
    return out


def goal_check(overall: dict[str, Any]) -> dict[str, bool | None]:
    checks: dict[str, bool | None] = {}
    for key, (op, bound) in GOALS.items():
        v = overall.get(key, float("nan"))
        if v is None or math.isnan(v):
            checks[key] = None
        else:
            checks[key] = bool(v >= bound) if op == ">=" else bool(v <= bound)
    return checks


def _clean(obj: Any) -> Any:
    """NaN -> null: JSON has no NaN."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def _fmt(key: str, v: float | None) -> str:
    if v is None or math.isnan(v):
        return "–"
    if key in ("off_brain_mass", "off_brain_mass_tumour", "off_brain_peak", "empty_map"):
        return f"{100 * v:.1f} %"
    return f"{v:.3f}"


def _goal_text(key: str) -> str:
    op, bound = GOALS[key]
    sign = "≥" if op == ">=" else "≤"
    if key == "deletion_ratio":
        return f"deletion {sign} {bound} × random"
    if key == "off_brain_mass":
        return f"off-brain {sign} {100 * bound:.0f} %"
    return f"{METRICS[key]} {sign} {bound}"


def overall_table(report: dict[str, Any]) -> str:
    head = ["method", *METRICS.values(), "goals met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, res in report["methods"].items():
        checks = res["goals"]
        met = sum(1 for v in checks.values() if v)
        lines.append(
            "| "
            + " | ".join(
                [m, *(_fmt(k, res["overall"][k]) for k in METRICS), f"{met}/{len(checks)}"]
            )
            + " |"
        )
    for name, res in report.get("references", {}).items():
        lines.append(
            "| "
            + " | ".join([f"*{REFERENCE_TITLES[name]}*",
                          *(_fmt(k, res["overall"][k]) for k in METRICS), ""])
            + " |"
        )
    return "\n".join(lines)


def twin_table(report: dict[str, Any]) -> list[str]:
    """The counterfactual shortcut check as Markdown lines (empty if not demo data)."""
    twins = report.get("lesion_free_twins")
    if not twins:
        return []
    lines = [
        "## Shortcut check: the same scans without their lesions",
        "",
        "Each tumour image re-rendered by the demo generator without its lesion, all else "
        "identical. A model that decides on the lesion calls the twin healthy.",
        "",
        "| class | n | twin called healthy | mean p(true), original | mean p(true), twin | "
        "twin predicted as |",
        "|---|---|---|---|---|---|",
    ]
    for cls, res in [*twins["per_class"].items(), ("all", twins)]:
        counts = ", ".join(f"{lab} {n}" for lab, n in res["twin_predicted"].items() if n)
        lines.append(f"| {cls} | {res['n_images']} | {_fmt('a', res['twin_called_healthy'])} | "
                     f"{_fmt('a', res['mean_p_true'])} | {_fmt('a', res['mean_p_true_twin'])} | "
                     f"{counts} |")
    return lines


def randomization_table(report: dict[str, Any]) -> list[str]:
    check = report.get("randomization")
    if not check:
        return []
    lines = [
        "",
        "## Sanity check: shuffled weights",
        "",
        f"Every kernel of the model shuffled (seed {check['seed']}), exported, and the same "
        f"{check['n_images']} images explained again. Spearman rank correlation of each "
        "method's maps (explained layer grid) with the trained model's: near 0, the map "
        "depends on what the model learned; near 1, it would look the same for any weights.",
        "",
        *([f"The shuffled model did not export: {check['error']}", ""]
          if check.get("error") else []),
        "| method | mean rank correlation | maps compared |",
        "|---|---|---|",
    ]
    for m, res in check["methods"].items():
        rho = res["mean_rank_correlation"]
        lines.append(f"| {m} | {'–' if rho is None else f'{rho:.2f}'} | {res['n_defined']} |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"# Explanation quality: {report['model']}",
        "",
        f"Data `{report['data']}`, split `{report['split']}`: {report['n_images']} images "
        f"({report['n_lesion_images']} with a lesion mask). Model accuracy on them: "
        f"{_fmt('accuracy', report['accuracy'])}. Explained class: the true class.",
        "",
        f"CAMs are computed at the model input ({s['cam_resolution']}) and resized to each "
        f"image. Pointing game: the CAM maximum within {100 * s['pointing_tolerance']:.0f} % of "
        "the shorter image side of the lesion (strict: on a lesion pixel). Deletion/insertion: "
        f"{s['steps']} steps, '{s['baseline']}' baseline, target-class probability, trapezoid AUC; "
        f"random pixel order with seed {s['seed']}; deletion ratio = mean deletion AUC / mean "
        "random deletion AUC. Lesion metrics and deletion/insertion average over tumour images; "
        "off-brain mass and peak over all images whose map is not all zero (such a map points "
        "nowhere; the empty-maps column gives their share). Off-brain peak: the share of the "
        "CAM's half-maximum region outside the brain (a flat floor over the background adds "
        "to the mass, not to the peak).",
        "",
        f"The explained layer `{s['layer']}` is a {s['layer_grid']} grid. Two reference rows "
        "frame the figures: a uniform map (chance) and the lesion mask itself, area-pooled to "
        "that grid and upsampled like a CAM: the best any CAM of this layer can score.",
        "",
        "## Overall",
        "",
        overall_table(report),
        "",
        "## Goal check",
        "",
        "| method | " + " | ".join(_goal_text(k) for k in GOALS) + " |",
        "|---|" + "---|" * len(GOALS),
    ]
    for m, res in report["methods"].items():
        cells = []
        for k in GOALS:
            ok = res["goals"][k]
            mark = "n/a" if ok is None else ("✓" if ok else "✗")
            cells.append(f"{mark} {_fmt(k, res['overall'][k])}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", *twin_table(report), *randomization_table(report)]
    lines += [
        "",
        "## Per class",
        "",
        "| method | class | n | " + " | ".join(METRICS.values()) + " |",
        "|---|---|---|" + "---|" * len(METRICS),
    ]
    per_class = {**report["methods"],
                 **{f"*{REFERENCE_TITLES[k]}*": v for k, v in report["references"].items()}}
    for m, res in per_class.items():
        for cls, agg in res["per_class"].items():
            lines.append(
                f"| {m} | {cls} | {agg['n_images']} | "
                + " | ".join(_fmt(k, agg[k]) for k in METRICS)
                + " |"
            )
    lines += ["", f"![grid]({GRID_PNG})", ""]
    return "\n".join(lines)


def save_grid(grid: list[GridRow], methods: list[str], path: Path) -> None:
    """Rows: a few images per tumour class; columns: image | lesion outline | methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = ["image", "lesion mask", *methods]
    if not grid:
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, "no tumour images with lesion masks", ha="center", va="center")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    n_rows, n_cols = len(grid), len(titles)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.9 * n_cols, 2.0 * n_rows), squeeze=False)
    for r, row in enumerate(grid):
        for c, cell in enumerate(row.cells):
            ax = axes[r][c]
            ax.imshow(cell)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
        axes[r][0].set_ylabel(f"{row.cls}\np(true)={row.prob:.2f}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(
    model_dir: Path,
    data: Path,
    methods: list[str],
    split: str = "Testing",
    limit: int | None = None,
    out: Path | None = None,
    batch_size: int = 16,
    steps: int = CAUSAL_STEPS,
    baseline: str = "blur",
    seed: int = 0,
    grid_per_class: int = 2,
    keras: Path | None = None,
    sanity_images: int = 64,
    noise_samples: int | None = None,
) -> dict[str, Any]:
    """Evaluate, write the three outputs, return the report.

    With `keras` (the model's .keras file), also run the weight-randomisation sanity
    check (trainer/sanity_check.py) on `sanity_images` images spread over the split.
    """
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    model = OnnxModel(model_dir, providers=[p for p in DEFAULT_PROVIDERS if p in available])
    if not model.has_gradcam:
        raise ValueError(f"{model_dir} has no Grad-CAM graph (gradcam.onnx) to evaluate")
    spec = model.spec
    samples = collect_samples(data, split, spec.task, spec.labels, limit)
    rows, grid, facts = evaluate(
        model,
        samples,
        methods,
        batch_size=batch_size,
        steps=steps,
        baseline=baseline,
        seed=seed,
        grid_per_class=grid_per_class,
        data=data,
        noise_samples=noise_samples,
    )
    order = {c: i for i, c in enumerate(MULTICLASS_LABELS)}
    classes = sorted({r["class"] for r in rows}, key=lambda c: order.get(c, len(order)))

    def summarise(name: str) -> dict[str, Any]:
        mrows = [r for r in rows if r["method"] == name]
        return {
            "overall": aggregate(mrows),
            "per_class": {c: aggregate([r for r in mrows if r["class"] == c]) for c in classes},
        }

    result = {m: summarise(m) for m in methods}
    for res in result.values():
        res["goals"] = goal_check(res["overall"])
    references = {name: summarise(name) for name in REFERENCES}
    randomization = None
    if keras is not None and samples:
        from trainer.sanity_check import randomization_check

        picked = [samples[i] for i in np.unique(
            np.linspace(0, len(samples) - 1, min(sanity_images, len(samples))).astype(int)
        )]
        x = np.stack([preprocess(load_image(s.path), spec.preprocessing) for s in picked])
        randomization = randomization_check(
            model, keras, x, np.array([s.target for s in picked]),
            [m for m in methods if m in METHODS],  # the Grad-CAM graph's own methods
            calibration=find_split_dir(data, split), seed=seed,
        )
    first = result[methods[0]]["overall"] if methods else {}
    report: dict[str, Any] = {
        "model": spec.name,
        "model_dir": str(model_dir),
        "task": spec.task,
        "labels": spec.labels,
        "data": str(data),
        "split": split,
        "n_images": facts["n_images"],
        "n_lesion_images": first.get("n_lesion_images", 0),
        "accuracy": facts["accuracy"],
        "lesion_free_twins": facts["lesion_free_twins"],
        "skipped": facts["skipped"],
        "providers": model.providers.active,
        "settings": {
            "target": "true class",
            "cam_resolution": f"{spec.preprocessing.width}x{spec.preprocessing.height}",
            "layer": spec.explanation.layer,
            "layer_grid": facts["layer_grid"],
            "pointing_tolerance": POINTING_TOLERANCE,
            "top_fraction": TOP_FRACTION,
            "steps": steps,
            "baseline": baseline,
            "seed": seed,
            "limit_per_class": limit,
        },
        "goals": {k: {"op": op, "value": v} for k, (op, v) in GOALS.items()},
        "methods": result,
        "references": references,
        "randomization": randomization,
    }
    out = out or model_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_JSON).write_text(json.dumps(_clean(report), indent=2) + "\n")
    (out / REPORT_MD).write_text(markdown(report))
    save_grid(grid, methods, out / GRID_PNG)
    return report


def parse_methods(text: str) -> list[str]:
    """Comma-separated METHOD or METHOD@LAYER entries (a CAM method at another layer of
    the model's attribution graph), or smoothgrad / integrated_gradients."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    valid = (*METHODS, *PIXEL_METHODS)
    unknown = [m for m in methods if split_entry(m)[0] not in valid
               or (split_entry(m)[1] is not None and split_entry(m)[0] in PIXEL_METHODS)]
    if unknown or not methods:
        raise InvalidParameter(
            f"unknown CAM method(s) {', '.join(unknown) or '(none given)'}; "
            f"valid methods: {', '.join(valid)}, a CAM method as METHOD@LAYER"
        )
    return list(dict.fromkeys(methods))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.explain_eval",
        description="Score CAM methods of an exported model against lesion and brain masks.",
    )
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="demo-data root (with masks/)")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated, default: {','.join(METHODS)}; also METHOD@LAYER (a layer of "
        "the attribution graph), smoothgrad, integrated_gradients",
    )
    parser.add_argument("--split", default="Testing")
    parser.add_argument("--limit", type=int, default=None, help="at most N images per class")
    parser.add_argument("--out", type=Path, default=None, help="default: the model directory")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=CAUSAL_STEPS, help="deletion/insertion steps")
    parser.add_argument(
        "--baseline",
        choices=("blur", "mean", "zero"),
        default="blur",
        help="what deleted pixels become",
    )
    parser.add_argument("--seed", type=int, default=0, help="random-order baseline seed")
    parser.add_argument("--grid-per-class", type=int, default=2)
    parser.add_argument("--samples", type=int, default=None,
                        help="smoothgrad's copies / integrated_gradients' steps (default 8)")
    parser.add_argument(
        "--keras",
        type=Path,
        default=None,
        help="the model's .keras file: also run the shuffled-weights sanity check",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    try:
        methods = parse_methods(args.methods)
        report = run(
            args.model_dir,
            args.data,
            methods,
            split=args.split,
            limit=args.limit,
            out=args.out,
            batch_size=args.batch_size,
            steps=args.steps,
            baseline=args.baseline,
            seed=args.seed,
            grid_per_class=args.grid_per_class,
            keras=args.keras,
            noise_samples=args.samples,
        )
    except (FileNotFoundError, ValueError) as exc:  # bad data dir, model dir, sha256 mismatch
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.out or args.model_dir
    print(
        f"\n{report['model']}: {report['n_images']} images "
        f"({report['n_lesion_images']} with lesions), accuracy {_fmt('a', report['accuracy'])}\n"
    )
    print(overall_table(report))
    print("\n".join(randomization_table(report)))
    print(f"\nwrote {out / REPORT_JSON}, {out / REPORT_MD}, {out / GRID_PNG}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
