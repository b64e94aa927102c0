"""Batched predictions over files on disk: the engine behind `braincam predict`.

Every file under the given paths is tried (the format is sniffed from its bytes,
as the service does), volumes slice by slice or at a chosen slice, and the
preprocessed images go through ONNX Runtime `batch_size` at a time. A file or a
slice that cannot be read becomes a row carrying the reason; it never stops the
run. Decoding, preprocessing, the decision and the CAM are the service's own
functions (braincam/pipeline.py), with the same pixel and volume budgets.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from braincam.cam import compute_cam, resize_cam
from braincam.decision import decide
from braincam.decoding import DEFAULT_MAX_PIXELS, MAX_VOLUME_BYTES, OpenedImage, open_image
from braincam.errors import InputError, PayloadTooLarge
from braincam.explainers import make_explainer, uses_attribution
from braincam.head import HEAD_WARNING, HeadCheck, check_head
from braincam.inference import OnnxModel
from braincam.occlusion import OCCLUSION, OcclusionSensitivity
from braincam.ood import OodVerdict, ood_verdict
from braincam.overlay import blend, colorize, encode_png, with_banner
from braincam.pipeline import Prepared, gradients_for, input_errors, prepare_slice
from braincam.series_analysis import negative_index

# A file is read whole before it is sniffed. Volumes may hold up to MAX_VOLUME_BYTES
# of pixel data (checked from their headers); this bounds the read itself, with
# room for DICOM/NIfTI headers and extensions.
MAX_FILE_BYTES = MAX_VOLUME_BYTES + 16 * 1024 * 1024

SliceChoice = Literal["all", "middle"] | int


@dataclass(frozen=True)
class InputFile:
    path: Path  # as found: under the PATH argument, relative if that was
    name: Path  # PATH's own name / the path below it: where its overlays go


@dataclass
class Discovery:
    files: list[InputFile] = field(default_factory=list)
    missing: list[Path] = field(default_factory=list)  # PATH arguments that do not exist
    unsearched_dirs: int = 0  # subdirectories left out without --recursive


def find_inputs(
    paths: Sequence[Path], recursive: bool = False, exclude: Sequence[Path] = ()
) -> Discovery:
    """Every regular file named or under `paths`, in a stable (sorted) order.

    Hidden entries (".*") inside directories are left out, and so are the
    `exclude` directories (the run's own overlays); a file named explicitly is
    always taken. A file reached twice is listed once.
    """
    found = Discovery()
    seen: set[Path] = set()
    excluded = {p.resolve() for p in exclude}

    def add(path: Path, name: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            found.files.append(InputFile(path, name))

    for root in paths:
        if root.is_file():
            add(root, Path(root.name))
        elif root.is_dir():
            base = Path(root.resolve().name or "root")
            for here, dirs, files in os.walk(root):
                dirs[:] = sorted(
                    d for d in dirs
                    if not d.startswith(".") and (Path(here) / d).resolve() not in excluded
                )
                if not recursive:
                    found.unsearched_dirs += len(dirs)
                    dirs[:] = []
                for fname in sorted(files):
                    path = Path(here) / fname
                    if not fname.startswith(".") and path.is_file():
                        add(path, base / path.relative_to(root))
        else:
            found.missing.append(root)
    return found


@dataclass
class Row:
    """One image or slice: its prediction, or why there is none."""

    path: str
    slice: int | None = None
    label: str | None = None
    confidence: float | None = None
    probabilities: dict[str, float] | None = None
    error: str | None = None
    overlay: str | None = None  # the overlay PNG written for it (--explain)
    # The out-of-distribution gate's verdict (models exported with a detector).
    ood: OodVerdict | None = None
    # Where the overlay's map lies against the head (--explain; braincam.head).
    head: HeadCheck | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def warnings(self) -> list[tuple[str, str]]:
        """(code, text) of what a reader of the row must know, as the service's answers."""
        ood = None if self.ood is None else self.ood.warning()
        head = None if self.head is None else self.head.warning()
        return [
            (code, text)
            for code, text in (("out_of_distribution", ood), (HEAD_WARNING, head))
            if text is not None
        ]


@dataclass(frozen=True)
class ExplainOptions:
    out_dir: Path
    method: str = "gradcam"
    colormap: str = "jet"
    alpha: float = 0.4
    layer: str | None = None  # another layer than the Grad-CAM graph's (attribution.onnx)
    samples: int | None = None  # smoothgrad / integrated_gradients


@dataclass
class _Ready:
    file: InputFile
    prepared: Prepared


@dataclass
class _FileDone:
    file: InputFile


def _error_text(exc: InputError) -> str:
    return f"{exc.code}: {exc.detail}"


def read_bounded(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The file's bytes; PayloadTooLarge past `limit` (checked before reading)."""
    size = path.stat().st_size
    if size > limit:
        raise PayloadTooLarge(
            f"the file is {size / 2**20:.0f} MiB, over the {limit // 2**20} MiB limit"
        )
    return path.read_bytes()


class BatchPredictor:
    """Predictions (and optionally overlays) for many files, in batched ORT runs.

    With `explain`, the Grad-CAM graph runs instead of the classifier: the
    probabilities come from that same run (as in the service's /explain) and each
    row's overlay is written under `explain.out_dir`. Occlusion (the method of models
    without a Grad-CAM graph) runs the classifier on occluded copies instead.
    """

    def __init__(
        self,
        model: OnnxModel,
        *,
        batch_size: int = 32,
        slices: SliceChoice = "all",
        explain: ExplainOptions | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model = model
        self.spec = model.spec
        self.batch_size = batch_size
        self.slices = slices
        self.explain = explain
        self.max_pixels = max_pixels
        self._overlay_names: set[Path] = set()

    def rows(
        self, files: Iterable[InputFile], on_file: Callable[[InputFile], None] | None = None
    ) -> Iterator[Row]:
        """One row per image or slice, in input order; `on_file` after each file is read."""
        pending: list[Row | _Ready] = []
        ready = 0
        for entry in self._entries_of(files):
            if isinstance(entry, _FileDone):
                if on_file is not None:
                    on_file(entry.file)
                continue
            if not ready and isinstance(entry, Row):
                yield entry  # nothing waits for the model before it
                continue
            pending.append(entry)
            ready += isinstance(entry, _Ready)
            # A full batch runs; so does a short one behind many unreadable files,
            # whose rows would otherwise wait (and pile up) for it.
            if ready == self.batch_size or len(pending) >= 4 * self.batch_size:
                yield from self._flush(pending)
                pending, ready = [], 0
        yield from self._flush(pending)

    def _entries_of(self, files: Iterable[InputFile]) -> Iterator[Row | _Ready | _FileDone]:
        """The files' entries, each file followed by its _FileDone.

        Read in this thread: a reader thread running a batch ahead (decoding while ORT
        runs) was measured no faster on two cores, where it takes a core from ORT's
        intra-op threads (benchmarks/bench_cli.py's set-up, 150x150 CNN).
        """
        for file in files:
            yield from self._entries(file)
            yield _FileDone(file)

    def _entries(self, file: InputFile) -> Iterator[Row | _Ready]:
        path = str(file.path)
        try:
            data = read_bounded(file.path)
            with input_errors():
                opened = open_image(data, max_pixels=self.max_pixels)
        except InputError as exc:
            yield Row(path, error=_error_text(exc))
            return
        except OSError as exc:
            yield Row(path, error=f"unreadable_file: {exc.strerror or exc}")
            return
        for index in self._slice_indices(opened):
            try:
                prepared = prepare_slice(opened, index, self.spec)
            except InputError as exc:
                yield Row(path, slice=index, error=_error_text(exc))
                continue
            yield _Ready(file, prepared)

    def _slice_indices(self, opened: OpenedImage) -> Sequence[int | None]:
        if opened.n_slices is None or self.slices == "middle":
            return [None]  # a 2-D image; or the decoder's middle slice
        if self.slices == "all":
            return range(opened.n_slices)
        return [self.slices]

    def _flush(self, pending: list[Row | _Ready]) -> Iterator[Row]:
        ready = [e for e in pending if isinstance(e, _Ready)]
        results = iter(self._run(ready) if ready else [])
        for entry in pending:
            yield next(results) if isinstance(entry, _Ready) else entry

    def _run(self, ready: list[_Ready]) -> list[Row]:
        batch = np.ascontiguousarray(np.concatenate([r.prepared.batch for r in ready]))
        if self.explain is None:
            classified = self.model.classify(batch)
            return self._rows(ready, classified.probabilities, classified.ood_score)
        method = self.explain.method
        if method == OCCLUSION:  # the classifier alone, as the service's /explain
            classified = self.model.classify(batch)
            probabilities = classified.probabilities
            rows = self._rows(ready, probabilities, classified.ood_score)
            targets = self._targets(rows)
            occlusion = OcclusionSensitivity()
            base = probabilities[np.arange(len(rows)), targets]
            drops = occlusion.drops(self.model.predict, batch, targets, base=base)
            cams = [
                occlusion.maps(drops[i : i + 1], r.prepared.decoded.size)[0]
                for i, r in enumerate(ready)
            ]
        elif uses_attribution(method, self.explain.layer, self.model):
            explainer = make_explainer(method, self.explain.layer, self.explain.samples,
                                       self.model)
            classified = self.model.classify(batch)
            rows = self._rows(ready, classified.probabilities, classified.ood_score)
            small = explainer(self.model, batch, self._targets(rows))
            cams = [resize_cam(small[i], r.prepared.decoded.size) for i, r in enumerate(ready)]
        else:
            out = self.model.gradcam(batch)
            rows = self._rows(ready, out.probabilities, out.ood_score)
            acts, grads, _ = gradients_for(self.model, batch, out, self._targets(rows))
            cams = [
                compute_cam(method, acts[i], grads[i], size=r.prepared.decoded.size)[0]
                for i, r in enumerate(ready)
            ]
        negative = negative_index(self.spec)
        for entry, row, cam in zip(ready, rows, cams, strict=True):
            flagged = row.ood is not None and not row.ood.in_distribution
            row.overlay = str(self._write_overlay(entry, cam, flagged))
            meaningful = self.spec.label_index(str(row.label)) != negative
            row.head = check_head(entry.prepared.decoded.pixels, cam, meaningful)
        return rows

    def _targets(self, rows: list[Row]) -> np.ndarray:
        """The decided class of each row: what its map explains."""
        return np.array([self.spec.label_index(str(row.label)) for row in rows], np.int64)

    def _rows(
        self, ready: list[_Ready], probabilities: np.ndarray, ood_scores: np.ndarray | None
    ) -> list[Row]:
        scores = [None] * len(ready) if ood_scores is None else list(ood_scores)
        return [
            self._row(r, p, s) for r, p, s in zip(ready, probabilities, scores, strict=True)
        ]

    def _row(self, entry: _Ready, probabilities: np.ndarray, ood_score: Any) -> Row:
        decision = decide(probabilities, self.spec)
        return Row(
            str(entry.file.path),
            slice=entry.prepared.decoded.slice_index,
            label=decision.label,
            confidence=decision.confidence,
            probabilities=decision.probabilities,
            ood=ood_verdict(ood_score, self.spec),
        )

    def _write_overlay(self, entry: _Ready, cam: np.ndarray, flagged: bool) -> Path:
        """The overlay PNG; an image the out-of-distribution gate flagged carries the
        banner, so the file says it wherever it is copied."""
        options = self.explain
        assert options is not None
        decoded = entry.prepared.decoded
        overlay = blend(decoded.pixels, colorize(cam, options.colormap), options.alpha)
        if flagged:
            overlay = with_banner(overlay)
        target = self._overlay_path(entry.file, decoded.slice_index)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(encode_png(overlay))
        return target

    def _overlay_path(self, file: InputFile, slice_index: int | None) -> Path:
        """OUTDIR/<PATH's name>/<relative path>_overlay.png (+ slice; -2, -3... if taken)."""
        assert self.explain is not None
        stem = _strip_image_suffix(file.name.name)
        if slice_index is not None:
            stem += f"_slice{slice_index:03d}"
        base = self.explain.out_dir / file.name.parent / stem
        candidate, k = base.with_name(f"{stem}_overlay.png"), 1
        while candidate in self._overlay_names:
            k += 1
            candidate = base.with_name(f"{stem}_overlay-{k}.png")
        self._overlay_names.add(candidate)
        return candidate


_IMAGE_SUFFIXES = (".nii.gz", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".nii")


def _strip_image_suffix(name: str) -> str:
    lowered = name.lower()
    for suffix in _IMAGE_SUFFIXES:
        if lowered.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name
