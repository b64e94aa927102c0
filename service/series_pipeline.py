"""The blocking work behind /predict/series and /explain/series (run in worker threads):
read the series (braincam.series), run it (braincam.series_analysis), and on request
build its DICOM results (braincam.dicom_results)."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from braincam import DISCLAIMER
from braincam.cam import default_method
from braincam.dicom_results import ResultWarning, build_results, result_warnings
from braincam.errors import InvalidParameter
from braincam.inference import Classified, OnnxModel
from braincam.occlusion import OCCLUSION
from braincam.overlay import to_base64
from braincam.pipeline import input_errors
from braincam.series import Series, SeriesLimits, read_series
from braincam.series_analysis import SERIES_RULE, SeriesResult, analyse
from service.core.config import Settings
from service.metrics import Metrics
from service.schemas import (
    AnswerWarning,
    DicomObject,
    ModelRef,
    SeriesInfo,
    SeriesResponse,
    SeriesTiming,
    SliceResult,
)

Output = Literal["json", "dicom"]


@dataclass(frozen=True)
class SeriesParams:
    output: Output = "json"
    explain: bool = False  # /explain/series: the deciding slice's overlay
    slices: str = "deciding"  # overlays of: deciding, all, or indices "0,5,7"
    method: str | None = None  # None: the model's default (braincam.cam.default_method)
    colormap: str = "jet"
    alpha: float = 0.4
    png_compression: int | None = None  # None: fpng; 0..9: libpng at that zlib level
    # BRAINCAM_OOD_POLICY: reject refuses a series whose every slice the gate flags.
    ood_policy: Literal["warn", "reject"] = "warn"


def png_level(settings: Settings) -> int | None:
    """How the series overlays are written: as /explain's (unset: fpng)."""
    return settings.png_compression


def limits_from(settings: Settings) -> SeriesLimits:
    return SeriesLimits(
        max_slices=settings.max_series_slices,
        max_total_pixels=settings.max_series_pixels,
        max_slice_pixels=settings.max_image_pixels,
        max_zip_entries=settings.max_zip_entries,
        max_compression_ratio=settings.max_zip_ratio,
    )


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def parse_slices(value: str, n: int) -> list[int]:
    """'deciding' -> [], 'all' -> every slice, '0,5' -> those (checked against n)."""
    text = value.strip().lower()
    if text in ("", "deciding"):
        return []
    if text == "all":
        return list(range(n))
    out = set()
    for part in text.split(","):
        part = part.strip()
        if not (part.isascii() and part.isdigit()) or int(part) >= n:
            raise InvalidParameter(
                f"'slices' must be deciding, all, or slice indices 0..{n - 1}, "
                f"got {part[:32]!r}"
            )
        out.add(int(part))
    return sorted(out)


def read(files: Sequence[tuple[str, bytes]], limits: SeriesLimits) -> Series:
    with input_errors("the series"):
        return read_series(files, limits)


def run_series(
    model: OnnxModel,
    metrics: Metrics,
    files: Sequence[tuple[str, bytes]],
    limits: SeriesLimits,
    params: SeriesParams,
    started: float,
    classify: Callable[[np.ndarray], Classified] | None = None,
) -> SeriesResponse:
    t0 = time.perf_counter()
    series = read(files, limits)
    read_s = time.perf_counter() - t0
    if params.output == "dicom" and series.format != "dicom":
        raise InvalidParameter(
            "output=dicom needs a DICOM series: a NIfTI volume has no study to add results to"
        )
    explain = parse_slices(params.slices, len(series.slices)) if params.explain else []
    method = params.method or default_method(model.has_gradcam)
    result = analyse(
        model,
        series,
        explain=explain,
        explain_deciding=params.explain or params.output == "dicom",
        method=method,
        colormap=params.colormap,
        alpha=params.alpha,
        classify=classify,
        ood_policy=params.ood_policy,
    )
    metrics.inference.labels(graph="classifier").observe(result.inference_s)
    if result.overlays:
        graph = "occlusion" if method == OCCLUSION else "gradcam"
        metrics.inference.labels(graph=graph).observe(result.explain_s)
    # One list for the JSON and the DICOM results: what one says, the other says.
    warnings = result_warnings(result)
    t1 = time.perf_counter()
    dicom = _dicom_objects(series, result, model, warnings) if params.output == "dicom" else None
    dicom_s = time.perf_counter() - t1
    return _response(model, series, result, params, dicom, warnings, read_s, dicom_s, started)


def _dicom_objects(
    series: Series, result: SeriesResult, model: OnnxModel, warnings: Sequence[ResultWarning]
) -> list[DicomObject]:
    overlay = result.overlays[result.deciding_slice]
    results = build_results(series, result, model.spec, overlay, warnings)
    return [
        _dicom_object("sr", results.sr),
        _dicom_object("secondary_capture", results.secondary_capture),
    ]


def _dicom_object(kind: Literal["sr", "secondary_capture"], ds: Any) -> DicomObject:
    return DicomObject(
        kind=kind,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        data_base64=base64.b64encode(to_bytes(ds)).decode("ascii"),
    )


def to_bytes(ds: Any) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _response(
    model: OnnxModel,
    series: Series,
    result: SeriesResult,
    params: SeriesParams,
    dicom: list[DicomObject] | None,
    warnings: Sequence[ResultWarning],
    read_s: float,
    dicom_s: float,
    started: float,
) -> SeriesResponse:
    spec = model.spec
    level = params.png_compression
    shown = set(result.overlays) if params.explain else set()
    slices = [
        SliceResult(
            index=i,
            label=d.label,
            class_index=d.class_index,
            confidence=d.confidence,
            probabilities=d.probabilities,
            position_mm=s.position,
            sop_instance_uid=s.sop_instance_uid,
            frame=s.frame,
            overlay_png=to_base64(result.overlays[i], "png", level) if i in shown else None,
            ood_score=v.ood_score if v else None,
            ood_threshold=v.ood_threshold if v else None,
            in_distribution=v.in_distribution if v else None,
            heat_outside_head=result.heads[i].heat_outside_head if i in shown else None,
            heat_on_rim=result.heads[i].heat_on_rim if i in shown else None,
        )
        for i, (d, s, v) in enumerate(
            zip(result.decisions, series.slices, result.ood, strict=True)
        )
    ]
    first = series.datasets[0] if series.datasets else None
    decision = result.decision
    gate = result.gate
    # The deciding slice's map (made for /explain/series and for output=dicom's overlay).
    head = result.heads.get(result.deciding_slice)
    return SeriesResponse(
        label=decision.label,
        class_index=decision.class_index,
        confidence=decision.confidence,
        probabilities=decision.probabilities,
        deciding_slice=result.deciding_slice,
        rule=SERIES_RULE,
        in_distribution=None if gate is None else gate.in_distribution,
        flagged_slices=None if gate is None else gate.flagged,
        ood_score=None if gate is None else gate.deciding.ood_score,
        ood_threshold=None if gate is None else gate.deciding.ood_threshold,
        warnings=[AnswerWarning(code=w.code, detail=w.text) for w in warnings],
        heat_outside_head=None if head is None else head.heat_outside_head,
        heat_on_rim=None if head is None else head.heat_on_rim,
        model=ModelRef(name=spec.name, version=spec.version, notice=spec.notice),
        series=SeriesInfo(
            format=series.format,
            n_slices=len(series.slices),
            ordered_by=series.ordered_by,
            series_instance_uid=series.series_instance_uid,
            study_instance_uid=None if first is None else str(first.get("StudyInstanceUID", "")),
            skipped=series.skipped,
        ),
        slices=slices,
        batches=result.batches,
        method=params.method if params.explain else None,
        overlay_png=slices[result.deciding_slice].overlay_png if params.explain else None,
        dicom=dicom,
        timing_ms=SeriesTiming(
            read=_ms(read_s),
            preprocess=_ms(result.preprocess_s),
            inference=_ms(result.inference_s),
            explain=_ms(result.explain_s),
            dicom=_ms(dicom_s),
            total=_ms(time.perf_counter() - started),
        ),
        disclaimer=DISCLAIMER,
    )
