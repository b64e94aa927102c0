"""`braincam audit PATH... --out OUTDIR`: how good are this model's explanations?

For a model directory braincam serves (Keras- or ONNX-exported, or classifier-only and
explained by occlusion) and the user's own images, no masks needed: faithfulness
(ROAD and blur deletion/insertion against a random order and a uniform map, the
decision-flip share), the cascading randomisation sanity check, where the heat lies
(outside the head, on its rim) and stability (mirror, noise). Writes OUTDIR/audit.json,
audit.md and worst_images.png; a progress bar and the summary go to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from braincam import DISCLAIMER
from braincam.cam import CLASSIFIER_METHODS, METHODS, available_methods, resize_cam
from braincam.cli import UsageError
from braincam.commands.common import (
    add_model_arguments,
    load_model,
    model_notice,
    positive_int,
)

DEFAULT_HEAD_THRESHOLD = 0.5  # braincam.head.OUTSIDE_THRESHOLD, the service's warning


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or directories")
    add_model_arguments(p)
    p.add_argument("--out", type=Path, required=True, metavar="OUTDIR",
                   help="where audit.json, audit.md and worst_images.png go")
    p.add_argument("--methods", help="comma-separated (default: every method the model "
                   f"offers but occlusion; valid: {','.join([*METHODS, *CLASSIFIER_METHODS])})")
    p.add_argument("-r", "--recursive", action="store_true", help="descend into subdirectories")
    p.add_argument("--limit", type=positive_int, help="at most N images, evenly spread")
    p.add_argument("--road-steps", type=positive_int, default=10,
                   help="ROAD deletion/insertion steps (10: ROAD's 10 %% steps)")
    p.add_argument("--blur-steps", type=positive_int, default=16,
                   help="blur deletion/insertion steps (16, as trainer.explain_eval)")
    p.add_argument("--sanity-images", type=int, default=16,
                   help="images the randomisation test explains at each step (0: skip it)")
    p.add_argument("--no-stability", action="store_true", help="skip the mirror/noise check")
    p.add_argument("--head-threshold", type=_fraction, default=DEFAULT_HEAD_THRESHOLD,
                   help="list images with more than this share of heat outside the head "
                   "(0.5, the service's warning)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _methods(text: str | None, has_gradcam: bool) -> list[str]:
    offered = available_methods(has_gradcam, classifier_methods=True)
    if text is None:
        return [m for m in offered if m not in CLASSIFIER_METHODS] or list(CLASSIFIER_METHODS)
    methods = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    bad = [m for m in methods if m not in offered]
    if bad or not methods:
        raise UsageError(f"method(s) {', '.join(bad) or '(none)'} not offered by this model; "
                         f"it offers {', '.join(offered)}")
    return methods


def _progress_bar(quiet: bool) -> Any:
    if quiet:
        return None
    try:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
    except ImportError:  # rich is a base dependency; a stripped install just runs quietly
        return None
    return Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=Console(stderr=True))


def run(args: argparse.Namespace) -> int:
    try:
        import onnx  # noqa: F401 - the randomisation test edits the graphs
        import scipy  # noqa: F401 - ROAD's sparse solve, Spearman, the head mask
    except ImportError as exc:
        raise UsageError(f"braincam audit needs {exc.name}: pip install 'braincam[audit]'"
                         ) from exc
    from braincam.audit.engine import AuditSettings, audit, load_images, sanity_indices
    from braincam.audit.faithfulness import FaithfulnessSettings
    from braincam.audit.maps import Explainer
    from braincam.audit.report import (
        AUDIT_JSON,
        AUDIT_MD,
        GRID_PNG,
        grid_png,
        markdown,
        summarise,
        worst_images,
        write_json,
    )

    model = load_model(args)
    methods = _methods(args.methods, model.has_gradcam)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {args.out}: {exc.strerror or exc}") from exc
    started = time.perf_counter()
    loaded = load_images(args.paths, model, args.recursive, exclude=[args.out],
                         limit=args.limit)
    if not loaded.images:
        print("braincam audit: no image could be read", file=sys.stderr)
        for s in loaded.skipped[:10]:
            print(f"  {s['path']}: {s['error']}", file=sys.stderr)
        return 1
    faith = FaithfulnessSettings(road_steps=args.road_steps, blur_steps=args.blur_steps,
                                 seed=args.seed)
    settings = AuditSettings(tuple(methods), faith, sanity_images=max(args.sanity_images, 0),
                             stability=not args.no_stability, seed=args.seed)
    n = len(loaded.images)
    groups = 0
    if settings.sanity_images:
        import onnx as onnx_lib

        from braincam.audit.randomisation import layer_groups

        graphs = model.spec.graphs
        names = [graphs.gradcam.file] if graphs.gradcam and set(methods) - {"occlusion"} else []
        names += [graphs.classifier.file] if "occlusion" in methods else []
        groups = sum(len(layer_groups(onnx_lib.load(str(model.model_dir / f)),
                                      "probabilities")) for f in names)
    bar = _progress_bar(args.quiet)
    totals = {"faithfulness": n, "stability": n if settings.stability else 0,
              "randomisation": groups}
    if bar is None:
        result = audit(model, loaded.images, settings)
    else:
        with bar:
            tasks = {k: bar.add_task(k, total=v) for k, v in totals.items() if v}
            result = audit(model, loaded.images, settings,
                           lambda stage, k: bar.advance(tasks[stage], k))
    summary = summarise(result, methods, args.head_threshold)
    report = {
        "model": {"name": model.spec.name, "version": model.spec.version,
                  "model_dir": str(model.model_dir), "labels": model.spec.labels,
                  "layer": model.spec.explanation.layer,
                  "providers": model.providers.active},
        "inputs": [str(p) for p in args.paths],
        "settings": {"methods": methods, "road_steps": faith.road_steps,
                     "blur_steps": faith.blur_steps, "flip_fraction": faith.flip_fraction,
                     "sanity_images": int(sanity_indices(n, settings.sanity_images).size),
                     "noise_level": settings.noise_level, "head_threshold": args.head_threshold,
                     "seed": args.seed,
                     "input_size": f"{model.spec.preprocessing.width}x"
                                   f"{model.spec.preprocessing.height}"},
        "summary": summary,
        "images": result["images"],
        "randomisation": result["randomisation"],
        "skipped": loaded.skipped,
        "elapsed_s": round(time.perf_counter() - started, 1),
        "disclaimer": DISCLAIMER,
    }
    write_json(args.out / AUDIT_JSON, report)
    (args.out / AUDIT_MD).write_text(markdown(report), encoding="utf-8")
    picked = worst_images(report, methods[0])
    explainer = Explainer(model, methods)
    rows = []
    for i in picked:
        im = loaded.images[i]
        maps = explainer.maps(im.x[None], np.array([im.target]))
        h, w = im.pixels.shape[:2]
        heat = report["images"][i]["methods"][methods[0]]["heat_outside_head"]
        caption = f"{report['images'][i]['label']}: {Path(im.path).name}, {methods[0]} " + (
            "heat outside head -" if heat is None else f"heat outside head {100 * heat:.0f} %")
        rows.append((caption, im.pixels, {m: resize_cam(v[0], (w, h)) for m, v in maps.items()}))
    (args.out / GRID_PNG).write_bytes(grid_png(rows, methods))
    _print_summary(report, args.out)
    notice = model_notice(model)
    print(f"Research use only. {DISCLAIMER}" + (f"\n{notice}" if notice else ""),
          file=sys.stderr)
    return 0


def _print_summary(report: dict[str, Any], out: Path) -> None:
    summary = report["summary"]
    err = sys.stderr
    print(f"\naudited {summary['n_images']} image(s) in {report['elapsed_s']} s "
          f"({len(report['skipped'])} skipped)", file=err)
    print(f"{'map':<12} {'del ROAD':>9} {'ins ROAD':>9} {'del blur':>9} {'flip':>6} "
          f"{'outside':>8} {'mirror':>7} {'max rnd ρ':>9}", file=err)

    def f(v: Any, pct: bool = False) -> str:
        return "-" if v is None else (f"{100 * v:.0f}%" if pct else f"{v:.3f}")

    rows = [(m, v) for m, v in summary["methods"].items()]
    rows += [(r, v) for r, v in summary["references"].items()]
    for name, v in rows:
        print(f"{name:<12} {f(v['deletion_auc']):>9} {f(v['insertion_auc']):>9} "
              f"{f(v['deletion_auc_blur']):>9} {f(v['flip_share'], True):>6} "
              f"{f(v.get('heat_outside_head'), True):>8} {f(v.get('flip_spearman')):>7} "
              f"{f(v.get('max_randomised_spearman')):>9}", file=err)
    print(f"wrote {out / 'audit.json'}, {out / 'audit.md'}, {out / 'worst_images.png'}",
          file=err)
