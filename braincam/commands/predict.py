"""`braincam predict PATH...`: classify every image and volume under the paths.

One row per image or slice (CSV or JSONL, to a file or stdout), optional overlay
PNGs, a progress bar and a summary on stderr. Unreadable files become rows with
their reason; the exit status is 0 unless nothing at all could be read (1) or
the command line is wrong (2).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from braincam import DISCLAIMER
from braincam.batch import (
    BatchPredictor,
    Discovery,
    ExplainOptions,
    InputFile,
    Row,
    SliceChoice,
    find_inputs,
)
from braincam.cam import CLASSIFIER_METHODS, METHODS, available_methods, default_method
from braincam.cli import UsageError
from braincam.commands.common import (
    add_model_arguments,
    load_model,
    model_notice,
    positive_int,
)
from braincam.decoding import DEFAULT_MAX_PIXELS
from braincam.errors import InputError
from braincam.explainers import PIXEL_METHODS, make_explainer, uses_attribution
from braincam.inference import OnnxModel
from braincam.ood import OOD_FIELDS
from braincam.overlay import COLORMAPS

FORMATS = ("csv", "jsonl")
_SUFFIX_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_EXAMPLES = 3  # paths shown per skip reason in the summary


def _slices(text: str) -> SliceChoice:
    if text in ("all", "middle"):
        return text  # type: ignore[return-value]
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"'all', 'middle' or a slice index, got {text!r}")


def _alpha(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or directories")
    add_model_arguments(p)
    p.add_argument(
        "--out",
        type=Path,
        help="results file, .csv or .jsonl (default: CSV on stdout)",
    )
    p.add_argument("--format", choices=FORMATS, help="override the format --out's suffix implies")
    p.add_argument("-r", "--recursive", action="store_true", help="descend into subdirectories")
    p.add_argument(
        "--slices",
        type=_slices,
        default="all",
        help="volumes (DICOM multi-frame, NIfTI): 'all' slices (default), the 'middle' one, "
        "or a slice index",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=32, help="images per ONNX Runtime run (32)"
    )
    p.add_argument(
        "--explain",
        type=Path,
        metavar="OUTDIR",
        help="write a heatmap overlay PNG per row under OUTDIR",
    )
    p.add_argument(
        "--method",
        choices=[*METHODS, *CLASSIFIER_METHODS, *PIXEL_METHODS],
        help="explanation method for --explain (default: gradcam, or occlusion for a model "
        "without a Grad-CAM graph; occlusion costs seconds per image); with the model's "
        "attribution graph, layercam is fused over its layers and smoothgrad and "
        "integrated_gradients give pixel-resolution maps",
    )
    p.add_argument(
        "--layer",
        help="layer for --explain's CAM method (an attribution-graph layer; see "
        "`braincam info`), instead of the Grad-CAM graph's",
    )
    p.add_argument(
        "--samples", type=positive_int,
        help="noisy copies (smoothgrad) or path steps (integrated_gradients); default 8",
    )
    p.add_argument(
        "--colormap", choices=list(COLORMAPS), default="jet", metavar="NAME",
        help="heatmap colormap for --explain (OpenCV's names; default jet)",
    )
    p.add_argument(
        "--alpha", type=_alpha, default=0.4, help="heatmap opacity for --explain (0.4)"
    )
    p.add_argument(
        "--max-pixels",
        type=positive_int,
        default=DEFAULT_MAX_PIXELS,
        help="largest image or slice decoded, in pixels (the service's default)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _output_format(args: argparse.Namespace) -> str:
    if args.format:
        return str(args.format)
    if args.out is None:
        return "csv"
    fmt = _SUFFIX_FORMATS.get(args.out.suffix.lower())
    if fmt is None:
        raise UsageError(f"cannot tell the format of {args.out}: name it .csv or .jsonl")
    return fmt


# With --explain: where the overlay's map lies against the head (braincam.head), and
# the codes of the row's warnings (out_of_distribution, heat_outside_head).
EXPLAIN_FIELDS = ("heat_outside_head", "heat_on_rim", "warnings")


class CsvRows:
    """path, slice, label, confidence, p_<label>..., ood_score, ood_threshold,
    in_distribution (empty for models without a detector), error (, overlay,
    heat_outside_head, heat_on_rim, warnings: codes joined by ';')."""

    def __init__(self, stream: IO[str], labels: list[str], overlays: bool) -> None:
        self.labels = labels
        self.overlays = overlays
        self.writer = csv.writer(stream)
        header = ["path", "slice", "label", "confidence", *(f"p_{x}" for x in labels),
                  *OOD_FIELDS, "error"]
        self.writer.writerow([*header, "overlay", *EXPLAIN_FIELDS] if overlays else header)

    def write(self, row: Row) -> None:
        probs = row.probabilities or {}
        cells: list[Any] = [
            row.path,
            "" if row.slice is None else row.slice,
            row.label or "",
            "" if row.confidence is None else row.confidence,
            *(probs.get(label, "") for label in self.labels),
            *(row.ood.as_dict()[k] if row.ood else "" for k in OOD_FIELDS),
            row.error or "",
        ]
        if self.overlays:
            head = row.head.as_dict() if row.head else {}
            shares = ["" if head.get(k) is None else head[k] for k in EXPLAIN_FIELDS[:2]]
            codes = ";".join(code for code, _ in row.warnings())
            cells += [row.overlay or "", *shares, codes]
        self.writer.writerow(cells)


class JsonlRows:
    """One JSON object per line, named as the service's /predict response fields."""

    def __init__(self, stream: IO[str], labels: list[str], overlays: bool) -> None:
        self.stream = stream
        self.overlays = overlays

    def write(self, row: Row) -> None:
        record: dict[str, Any] = {
            "path": row.path,
            "slice": row.slice,
            "label": row.label,
            "confidence": row.confidence,
            "probabilities": row.probabilities,
            **(row.ood.as_dict() if row.ood else dict.fromkeys(OOD_FIELDS)),
            "error": row.error,
        }
        if self.overlays:
            record["overlay"] = row.overlay
            head = row.head.as_dict() if row.head else {}
            record["heat_outside_head"] = head.get("heat_outside_head")
            record["heat_on_rim"] = head.get("heat_on_rim")
            record["warnings"] = [{"code": c, "detail": t} for c, t in row.warnings()]
        self.stream.write(json.dumps(record) + "\n")


def _progress(quiet: bool) -> Any:
    """A rich progress bar on stderr (files done, images, rate, ETA), or None."""
    if quiet:
        return None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("files"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[images]} images, {task.fields[rate]} img/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )


def run(args: argparse.Namespace) -> int:
    fmt = _output_format(args)
    # Overlays of an earlier run under a scanned folder are not scans.
    exclude = [args.explain] if args.explain is not None else []
    discovery = find_inputs(args.paths, recursive=args.recursive, exclude=exclude)
    model = load_model(args)
    explain = None
    if args.explain is not None:
        try:
            args.explain.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create {args.explain}: {exc.strerror or exc}") from exc
        method = args.method or default_method(model.has_gradcam)
        try:
            if uses_attribution(method, args.layer, model):
                make_explainer(method, args.layer, args.samples, model)
            elif args.layer is not None or args.samples is not None:
                raise InputError("--layer and --samples need a gradient method; --samples "
                                 "applies to smoothgrad and integrated_gradients only")
        except InputError as exc:
            raise UsageError(str(exc)) from exc
        if not uses_attribution(method, args.layer, model) and method not in available_methods(
            model.has_gradcam, classifier_methods=True
        ):
            raise UsageError(
                f"{model.model_dir} has no Grad-CAM graph: explain with --method occlusion"
            )
        explain = ExplainOptions(args.explain, method, args.colormap, args.alpha,
                                 args.layer, args.samples)
    predictor = BatchPredictor(
        model,
        batch_size=args.batch_size,
        slices=args.slices,
        explain=explain,
        max_pixels=args.max_pixels,
    )
    labels = model.spec.labels
    stream: IO[str]
    if args.out is None:
        stream = sys.stdout
    else:
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            stream = args.out.open("w", newline="" if fmt == "csv" else None, encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot write {args.out}: {exc.strerror or exc}") from exc
    writer = (CsvRows if fmt == "csv" else JsonlRows)(stream, labels, explain is not None)

    rows: list[Row] = [Row(str(path), error="not_found: no such file or directory")
                       for path in discovery.missing]
    started = time.perf_counter()
    try:
        for row in rows:
            writer.write(row)
        rows += _predict_all(predictor, discovery, writer.write, args.quiet)
    finally:
        if stream is not sys.stdout:
            stream.close()
        else:
            stream.flush()
    elapsed = time.perf_counter() - started
    _summary(args, model, discovery, rows, elapsed)
    return 0 if any(row.ok for row in rows) else 1


def _predict_all(
    predictor: BatchPredictor, discovery: Discovery, write: Callable[[Row], None], quiet: bool
) -> list[Row]:
    """Run the predictor over the files, writing each row as it comes (results survive
    an interrupted run); rows are kept for the summary (path, label, error only)."""
    rows: list[Row] = []
    progress = _progress(quiet)
    if progress is None:
        for row in predictor.rows(discovery.files):
            write(row)
            rows.append(_light(row))
        return rows
    started, done = time.perf_counter(), 0
    with progress:
        task = progress.add_task("predict", total=len(discovery.files), images=0, rate="-")

        def file_done(_: InputFile) -> None:
            progress.advance(task)

        for row in predictor.rows(discovery.files, on_file=file_done):
            write(row)
            rows.append(_light(row))
            if row.ok:
                done += 1
                rate = done / max(time.perf_counter() - started, 1e-9)
                progress.update(task, images=done, rate=f"{rate:.1f}")
    return rows


def _light(row: Row) -> Row:
    return Row(row.path, row.slice, label=row.label, error=row.error, head=row.head)


def _summary(
    args: argparse.Namespace,
    model: OnnxModel,
    discovery: Discovery,
    rows: list[Row],
    elapsed: float,
) -> None:
    out = sys.stderr
    spec = model.spec
    predicted = [r for r in rows if r.ok]
    failed = [r for r in rows if not r.ok]
    files_ok = len({r.path for r in predicted})
    rate = len(predicted) / elapsed if elapsed > 0 else 0.0
    print(
        f"\n{len(predicted)} image(s) classified from {files_ok} file(s) in {elapsed:.1f} s "
        f"({rate:.1f} images/s, batch {args.batch_size}), model {spec.name} v{spec.version} "
        f"on {', '.join(model.providers.active)}",
        file=out,
    )
    counts = Counter(r.label for r in predicted)
    width = max(len(label) for label in spec.labels)
    for label in spec.labels:
        print(f"  {label:<{width}}  {counts.get(label, 0)}", file=out)
    foreign = sum(r.ood is not None and not r.ood.in_distribution for r in predicted)
    if spec.ood is not None:
        print(f"unlike the training data (out-of-distribution gate, {spec.ood.detector}): "
              f"{foreign} of {len(predicted)}", file=out)
    if args.explain is not None:
        outside = sum(r.head is not None and r.head.outside for r in predicted)
        print(f"explanations lying mostly outside the head: {outside} of {len(predicted)}",
              file=out)
    if failed:
        skipped_files = {r.path for r in failed if r.slice is None} - {r.path for r in predicted}
        bad_slices = sum(r.slice is not None for r in failed)
        print(
            f"skipped: {len(skipped_files)} file(s)"
            + (f", {bad_slices} slice(s)" if bad_slices else ""),
            file=out,
        )
        reasons: dict[str, list[str]] = {}
        for r in failed:
            reasons.setdefault(r.error or "", []).append(
                r.path if r.slice is None else f"{r.path} [slice {r.slice}]"
            )
        for reason, paths in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
            examples = ", ".join(paths[:_EXAMPLES]) + (", ..." if len(paths) > _EXAMPLES else "")
            print(f"  {len(paths)} x {reason}  ({examples})", file=out)
    if discovery.unsearched_dirs:
        n = discovery.unsearched_dirs
        print(f"{n} subdirector{'y' if n == 1 else 'ies'} not searched (pass --recursive)",
              file=out)
    if not predicted:
        print("nothing could be read", file=out)
    where = "stdout" if args.out is None else str(args.out)
    print(f"rows written to {where}" + (f"; overlays under {args.explain}" if args.explain else ""),
          file=out)
    print(f"Research use only. {DISCLAIMER}", file=out)
    notice = model_notice(model)
    if notice:
        print(notice, file=out)
