"""POST /predict/series and /explain/series: a whole series in (DICOM files, one zip
of them, or one NIfTI volume), every slice through the model, one series decision,
and on request the results as DICOM objects (output=dicom)."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Response, UploadFile

from braincam.cam import CLASSIFIER_METHODS, METHODS
from braincam.errors import OutOfDistribution, PayloadTooLarge
from service import pipeline
from service.api.deps import MetricsDep, ModelDep, RuntimeDep, SettingsDep
from service.api.routes.explain import DEFAULT_ALPHA, DEFAULT_COLORMAP, _colormap
from service.api.routes.predict import json_bytes
from service.errors import error_responses
from service.middleware import upload_limit_message
from service.ood_gate import count_flagged
from service.schemas import SeriesResponse
from service.series_pipeline import SeriesParams, limits_from, png_level, run_series
from service.uploads import read_upload

router = APIRouter(tags=["inference"])

FilesField = Annotated[
    list[UploadFile],
    File(
        description="The series: several DICOM files (one per slice, any order, any "
        "names), or one zip of them, or one NIfTI volume (.nii, .nii.gz). Files that are "
        "not DICOM images (SR, DICOMDIR, text) are skipped and counted.",
    ),
]
OutputField = Annotated[
    Literal["json", "dicom"],
    Form(
        description="dicom: also return a DICOM Comprehensive SR and a Secondary Capture "
        "of the deciding slice's overlay (base64, in `dicom`), new series of the input's "
        "study. DICOM input only."
    ),
]
RESPONSES = error_responses(400, 413, 415, 422, 500, 503)


async def _read_files(files: list[UploadFile], limit: int) -> list[tuple[str, bytes]]:
    """Every file's bytes, the total bounded by `limit` as it is read."""
    out, total = [], 0
    for file in files:
        try:
            data = await read_upload(file, limit - total)
        except PayloadTooLarge:  # its message names what was left, not the limit
            raise PayloadTooLarge(upload_limit_message(limit)) from None
        total += len(data)
        out.append(((file.filename or "file")[:256], data))
    return out


@router.post(
    "/predict/series",
    response_model=SeriesResponse,
    summary="Classify a whole MRI series (DICOM files, a zip, or a NIfTI volume)",
    responses=RESPONSES,
)
async def predict_series(
    model: ModelDep,
    runtime: RuntimeDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    files: FilesField,
    output: OutputField = "json",
) -> Response:
    """Per-slice probabilities and the series decision (`rule`: the most probable
    tumour class over the slices decided as tumour, with the slice carrying it;
    notumor only when no slice is decided as a tumour class).

    Models with an out-of-distribution detector decide on the slices it passes and
    report `in_distribution`, `flagged_slices` and the deciding slice's score; a
    series whose every slice is flagged is answered with `in_distribution: false`
    and a warning, or, with BRAINCAM_OOD_POLICY=reject, refused with a 422
    `out_of_distribution` naming how many slices were flagged.

    Slices are ordered along the slice normal (ImagePositionPatient projected on the
    normal of ImageOrientationPatient), not by file name or InstanceNumber, and run
    in batches through the model's one ONNX Runtime session.
    """
    started = time.perf_counter()
    params = SeriesParams(
        output=output, png_compression=png_level(settings), ood_policy=settings.ood_policy
    )
    return await _run(model, runtime, settings, metrics, files, params, started)


@router.post(
    "/explain/series",
    response_model=SeriesResponse,
    summary="Classify a whole MRI series and explain the deciding slice",
    responses=RESPONSES,
)
async def explain_series(
    model: ModelDep,
    runtime: RuntimeDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    files: FilesField,
    output: OutputField = "json",
    slices: Annotated[
        str,
        Form(
            description="Overlays to return besides the deciding slice's: deciding (only "
            "it), all, or slice indices such as 0,4,9. Each map explains the class its "
            "slice was decided as.",
            examples=["deciding"],
        ),
    ] = "deciding",
    method: Annotated[
        str | None,
        Form(
            description="CAM method, as for /explain (default: gradcam, or occlusion for a "
            "model without a Grad-CAM graph; occlusion costs seconds per overlay).",
            json_schema_extra={"enum": [*METHODS, *CLASSIFIER_METHODS]},
        ),
    ] = None,
    alpha: Annotated[
        float, Form(ge=0.0, le=1.0, description="Heatmap opacity in the overlay.")
    ] = DEFAULT_ALPHA,
    colormap: Annotated[str, Form(description="OpenCV colormap name.")] = DEFAULT_COLORMAP,
) -> Response:
    """The /predict/series fields, plus `overlay_png` of the deciding slice (and of the
    slices asked for in `slices`, in each slice's `overlay_png`)."""
    started = time.perf_counter()
    params = SeriesParams(
        output=output,
        explain=True,
        slices=slices[:4096],
        method=pipeline.resolve_method(method, model, settings.occlusion),
        colormap=_colormap(colormap),
        alpha=alpha,
        png_compression=png_level(settings),
        ood_policy=settings.ood_policy,
    )
    return await _run(model, runtime, settings, metrics, files, params, started)


async def _run(
    model: ModelDep,
    runtime: RuntimeDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    files: list[UploadFile],
    params: SeriesParams,
    started: float,
) -> Response:
    data = await _read_files(files, settings.max_series_upload_bytes)
    metrics.upload_bytes.observe(sum(len(d) for _, d in data))
    limits = limits_from(settings)
    # With micro-batching on, the slices' classifier runs queue with /predict's.
    batchers = runtime.batchers
    classify = batchers.blocking_classify(asyncio.get_running_loop()) if batchers else None
    endpoint = "/explain/series" if params.explain else "/predict/series"
    try:
        result = await runtime.run(
            run_series, model, metrics, data, limits, params, started, classify
        )
    except OutOfDistribution:
        count_flagged(settings, metrics, endpoint)
        raise
    if result.in_distribution is False:
        count_flagged(settings, metrics, endpoint)
    return json_bytes(result)
