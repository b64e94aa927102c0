"""The audit's outputs: the summary figures, audit.json, audit.md and the grid PNG."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from braincam.audit.faithfulness import RANDOM, REFERENCES, UNIFORM
from braincam.demo_masks import LESION_METRICS
from braincam.overlay import blend, colorize, encode_png, to_rgb

AUDIT_JSON = "audit.json"
AUDIT_MD = "audit.md"
GRID_PNG = "worst_images.png"
# |Spearman| with the trained model's maps at or above which a randomisation step
# left a method's maps standing (Adebayo et al.'s failure).
RANDOMISATION_LIMIT = 0.5
FAITH_KEYS = ("deletion_auc", "insertion_auc", "deletion_auc_blur", "insertion_auc_blur")
DEMO_KEYS = (*LESION_METRICS, "off_brain_mass", "off_brain_peak")
GRID_CELL = 160  # px, longer side of a grid thumbnail
WORST_PER_CLASS = 3


def _mean(values: Sequence[Any]) -> float | None:
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(finite)) if finite else None


def _share(values: Sequence[Any]) -> float | None:
    known = [bool(v) for v in values if v is not None]
    return float(np.mean(known)) if known else None


def summarise(result: dict[str, Any], methods: Sequence[str],
              head_threshold: float) -> dict[str, Any]:
    """Means over images per method and reference, per predicted class for the heat,
    the images above `head_threshold`, and the randomisation verdicts."""
    images = result["images"]
    classes = sorted({im["label"] for im in images})
    out: dict[str, Any] = {"n_images": len(images), "methods": {}, "references": {}}
    for ref in REFERENCES:
        rows = [im["references"][ref] for im in images]
        out["references"][ref] = {
            **{k: _mean([r[k] for r in rows]) for k in FAITH_KEYS},
            "flip_share": _share([r["class_flips"] for r in rows]),
        }
    for m in methods:
        rows = [im["methods"][m] for im in images]
        summary: dict[str, Any] = {k: _mean([r[k] for r in rows]) for k in FAITH_KEYS}
        summary["flip_share"] = _share([r["class_flips"] for r in rows])
        rnd = out["references"][RANDOM]
        for k in ("deletion_auc", "deletion_auc_blur"):
            ok = summary[k] is not None and rnd[k]
            summary[f"{k}_vs_random"] = summary[k] / rnd[k] if ok else None
        for k in ("heat_outside_head", "heat_on_rim", "flip_spearman", "noise_spearman"):
            summary[k] = _mean([r.get(k) for r in rows])
        summary["heat_per_class"] = {
            c: {k: _mean([im["methods"][m][k] for im in images if im["label"] == c])
                for k in ("heat_outside_head", "heat_on_rim")} | {
                "n_images": sum(im["label"] == c for im in images)}
            for c in classes
        }
        summary["outside_head"] = [
            {"path": im["path"], "label": im["label"],
             "heat_outside_head": im["methods"][m]["heat_outside_head"]}
            for im in images
            if (im["methods"][m]["heat_outside_head"] or 0.0) > head_threshold
        ]
        demo = [r for r, im in zip(rows, images, strict=True) if im["demo_masks"]]
        if demo:
            summary["demo_masks"] = {k: _mean([r[k] for r in demo]) for k in DEMO_KEYS}
            summary["demo_masks"]["n_images"] = len(demo)
        steps = result["randomisation"].get(m) or []
        summary["randomised_spearman"] = steps[-1]["spearman"] if steps else None
        # Flagged when the maps survive any step: a map that stays put while the layers
        # above some point are noise does not depend on what those layers learned.
        rhos = [(abs(st["spearman"]), st["layer"]) for st in steps if st["spearman"] is not None]
        top = max(rhos) if rhos else None
        summary["max_randomised_spearman"] = top[0] if top else None
        summary["survives_randomisation_of"] = (
            top[1] if top and top[0] >= RANDOMISATION_LIMIT else None)
        summary["explains_model"] = None if top is None else top[0] < RANDOMISATION_LIMIT
        out["methods"][m] = summary
    return out


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")


def _f(v: Any, pct: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    return f"{100 * v:.1f} %" if pct else f"{v:.3f}"


def markdown(report: dict[str, Any]) -> str:
    s, summary = report["settings"], report["summary"]
    methods = list(summary["methods"])
    lines = [
        f"# Explanation audit: {report['model']['name']}",
        "",
        f"{summary['n_images']} images from {', '.join(report['inputs'])}"
        + (f" ({len(report['skipped'])} files skipped)" if report["skipped"] else "")
        + f". Each map explains the class the model decided. Model input "
        f"{s['input_size']}; providers {', '.join(report['model']['providers'])}.",
        "",
        "## Faithfulness",
        "",
        f"Deletion removes the map's most salient pixels first and follows p(decided class) "
        f"(lower area = more faithful); insertion keeps only the most salient ones (higher = "
        f"more faithful). ROAD: removed pixels filled by noisy linear imputation (Rong et al. "
        f"2022), {s['road_steps']} steps; blur: a heavy Gaussian blur, {s['blur_steps']} steps "
        f"(trainer.explain_eval's figures). References: a random pixel order and a uniform map "
        f"(all pixels tie: top rows first). Flip share: images whose decided class changes "
        f"when the map's top {100 * s['flip_fraction']:.0f} % is removed (ROAD).",
        "",
        "| map | deletion AUC (ROAD) | insertion AUC (ROAD) | deletion ÷ random | "
        "deletion AUC (blur) | insertion AUC (blur) | flip share |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [(m, summary["methods"][m]) for m in methods]
    rows += [(f"*{r}*", summary["references"][r]) for r in (RANDOM, UNIFORM)]
    for name, v in rows:
        lines.append(
            f"| {name} | {_f(v['deletion_auc'])} | {_f(v['insertion_auc'])} | "
            f"{_f(v.get('deletion_auc_vs_random'))} | {_f(v['deletion_auc_blur'])} | "
            f"{_f(v['insertion_auc_blur'])} | {_f(v['flip_share'], True)} |"
        )
    lines += [
        "",
        "## Sanity: cascading randomisation",
        "",
        f"The model's weights replaced by noise of the same std, layer group by layer group "
        f"from the top, on {s['sanity_images']} images; mean Spearman rank correlation of "
        f"each map with the trained model's (Adebayo et al. 2018). A method whose maps keep "
        f"|ρ| ≥ {RANDOMISATION_LIMIT} at any step (the layers above some point are noise, "
        f"the maps stand) does not explain what those layers learned.",
        "",
    ]
    rnd = report["randomisation"]
    steps = max((len(v) for v in rnd.values()), default=0)
    if steps:
        first = next(v for v in rnd.values() if v)
        head = [f"{st['step']}: {st['layer']}" for st in first]
        lines += ["| method | " + " | ".join(head) + " | explains the model |",
                  "|---|" + "---|" * (len(head) + 1)]
        for m in methods:
            cells = [_f(st["spearman"]) for st in rnd.get(m, [])]
            cells += ["–"] * (len(head) - len(cells))
            lines.append(f"| {m} | " + " | ".join(cells)
                         + f" | {_f(summary['methods'][m]['explains_model'])} |")
    else:
        lines.append("Not run.")
    lines += [
        "",
        "## Where the heat lies",
        "",
        "Share of each map's mass outside the head and on its rim (scalp and skull), on the "
        f"head mask of braincam/head.py; images above {100 * s['head_threshold']:.0f} % "
        "outside the head are listed below the table. Means per decided class.",
        "",
        "| method | class | n | heat outside head | heat on rim |",
        "|---|---|---|---|---|",
    ]
    for m in methods:
        for c, v in summary["methods"][m]["heat_per_class"].items():
            lines.append(f"| {m} | {c} | {v['n_images']} | {_f(v['heat_outside_head'], True)} "
                         f"| {_f(v['heat_on_rim'], True)} |")
    for m in methods:
        listed = summary["methods"][m]["outside_head"]
        if listed:
            lines += ["", f"{m}: {len(listed)} image(s) above the threshold:"]
            lines += [f"- `{r['path']}` ({r['label']}, {_f(r['heat_outside_head'], True)})"
                      for r in listed[:20]]
            if len(listed) > 20:
                lines.append(f"- ... and {len(listed) - 20} more (audit.json)")
    lines += [
        "",
        "## Stability",
        "",
        f"Spearman rank correlation of each map with the map of the mirrored image (mirrored "
        f"back), and of the image plus Gaussian noise of {s['noise_level']} × its std.",
        "",
        "| method | mirror | noise |",
        "|---|---|---|",
    ]
    for m in methods:
        v = summary["methods"][m]
        lines.append(f"| {m} | {_f(v['flip_spearman'])} | {_f(v['noise_spearman'])} |")
    demo_methods = [m for m in methods if "demo_masks" in summary["methods"][m]]
    if demo_methods:
        lines += [
            "",
            "## Against the demo data's masks",
            "",
            "Images whose demo-builder masks sit beside them; the figures of "
            "trainer.explain_eval (same functions), for the decided class.",
            "",
            "| method | n | " + " | ".join(DEMO_KEYS) + " |",
            "|---|---|" + "---|" * len(DEMO_KEYS),
        ]
        for m in demo_methods:
            v = summary["methods"][m]["demo_masks"]
            lines.append(f"| {m} | {v['n_images']} | "
                         + " | ".join(_f(v[k]) for k in DEMO_KEYS) + " |")
    lines += ["", f"![worst images]({GRID_PNG})", "",
              "Research use only: not a diagnostic device.", ""]
    return "\n".join(lines)


def worst_images(report: dict[str, Any], method: str,
                 per_class: int = WORST_PER_CLASS) -> list[int]:
    """Per decided class, the images whose `method` map has the most heat outside the
    head (ties: the higher ROAD deletion AUC, i.e. the less faithful map)."""
    images = report["images"]
    picked: list[int] = []
    for c in sorted({im["label"] for im in images}):
        idx = [i for i, im in enumerate(images) if im["label"] == c]

        def badness(i: int) -> tuple[float, float]:
            v = images[i]["methods"][method]
            return (v["heat_outside_head"] or 0.0, v["deletion_auc"] or 0.0)

        picked += sorted(idx, key=badness, reverse=True)[:per_class]
    return picked


def _thumb(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    s = GRID_CELL / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    out = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    canvas = np.full((GRID_CELL, GRID_CELL, 3), 255, dtype=np.uint8)
    canvas[: out.shape[0], : out.shape[1]] = out
    return canvas


def _text(width: int, height: int, text: str) -> np.ndarray:
    strip = np.full((height, width, 3), 255, dtype=np.uint8)
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.4
    (tw, th), _ = cv2.getTextSize(text, font, scale, 1)
    if tw > width - 4:
        scale *= (width - 4) / tw
        (tw, th), _ = cv2.getTextSize(text, font, scale, 1)
    cv2.putText(strip, text, (2, (height + th) // 2), font, scale, (20, 20, 20), 1,
                cv2.LINE_AA)
    return strip


def grid_png(rows: list[tuple[str, np.ndarray, dict[str, np.ndarray]]],
             methods: Sequence[str]) -> bytes:
    """One row per image: the image, then each method's overlay, titled; PNG bytes.
    `rows` are (caption, decoded pixels, {method: map at the image's size})."""
    strip = 18
    header = [_text(GRID_CELL, strip, t) for t in ("image", *methods)]
    lines = [np.hstack(header)]
    for caption, pixels, maps in rows:
        rgb = to_rgb(pixels)
        cells = [_thumb(rgb)] + [_thumb(blend(rgb, colorize(maps[m], "jet"), 0.4))
                                 for m in methods]
        lines.append(_text(GRID_CELL * len(cells), strip, caption))
        lines.append(np.hstack(cells))
    if len(lines) == 1:
        lines.append(_text(GRID_CELL * len(header), strip, "no images"))
    return encode_png(np.vstack(lines))
