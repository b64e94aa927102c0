"""POST /dicomweb/analyze: analyse a study on the configured PACS and store the results
(a DICOM SR and a Secondary Capture) back into it over DICOMweb.

The server talks only to BRAINCAM_DICOMWEB_URL (the caller names UIDs, never a URL),
and the route is off unless an API key is configured as well: it writes to a PACS.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from braincam import DISCLAIMER
from braincam.dicomweb import PacsError, analyse_study, connect, summary
from braincam.errors import OutOfDistribution
from service.api.deps import MetricsDep, ModelDep, RuntimeDep, SettingsDep
from service.api.routes.predict import json_bytes
from service.core.config import Settings
from service.errors import ServiceError, error_responses
from service.ood_gate import count_flagged
from service.schemas import AnswerWarning, ModelRef
from service.series_pipeline import limits_from

router = APIRouter(tags=["dicomweb"])


class AnalyzeRequest(BaseModel):
    study_instance_uid: str = Field(max_length=64, examples=["1.2.826.0.1.3680043.8.498.1"])
    series_instance_uid: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="series to analyse; empty: every image series of the study",
    )
    store: bool = Field(default=True, description="STOW-RS the SR and Secondary Capture")


class ObjectRef(BaseModel):
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str


class AnalyzedSeries(BaseModel):
    series_instance_uid: str
    label: str
    confidence: float
    probabilities: dict[str, float]
    n_slices: int
    skipped: dict[str, int]
    in_distribution: bool | None = Field(
        description="false: every slice was flagged (stored with the warning under "
        "BRAINCAM_OOD_POLICY=warn; refused, nothing stored, under reject)"
    )
    flagged_slices: int | None
    ood_score: float | None = Field(description="of the deciding slice")
    ood_threshold: float | None
    warnings: list[AnswerWarning] = Field(description="also carried by the stored SR")
    deciding_slice: int
    deciding_sop_instance_uid: str | None
    stored: bool
    sr: ObjectRef
    secondary_capture: ObjectRef
    timing_ms: dict[str, float] = Field(description="fetch, analyse, store")


class AnalyzeResponse(BaseModel):
    study_instance_uid: str
    results: list[AnalyzedSeries]
    model: ModelRef
    disclaimer: str


def _analyse(model: Any, settings: Settings, request: AnalyzeRequest) -> AnalyzeResponse:
    assert settings.dicomweb_url is not None
    client = connect(settings.dicomweb_url, timeout_s=settings.dicomweb_timeout_s)
    try:
        analysed = analyse_study(
            client,
            model,
            request.study_instance_uid,
            request.series_instance_uid,
            limits=limits_from(settings),
            store=request.store,
            ood_policy=settings.ood_policy,
        )
    except PacsError as exc:
        raise ServiceError(exc.status, exc.code, exc.detail) from exc
    spec = model.spec
    return AnalyzeResponse(
        study_instance_uid=request.study_instance_uid,
        results=[AnalyzedSeries.model_validate(summary(item)) for item in analysed],
        model=ModelRef(name=spec.name, version=spec.version, notice=spec.notice),
        disclaimer=DISCLAIMER,
    )


@router.post(
    "/dicomweb/analyze",
    response_model=AnalyzeResponse,
    summary="Analyse a study on the configured PACS and store the results back (DICOMweb)",
    responses=error_responses(400, 401, 404, 413, 422, 500, 502, 503, 504),
)
async def analyze(
    model: ModelDep,
    runtime: RuntimeDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    request: AnalyzeRequest,
) -> Response:
    """Fetches each series by WADO-RS, runs /predict/series on it, and (with `store`)
    stores a Comprehensive SR and a Secondary Capture of the deciding slice's overlay
    by STOW-RS, as new series of the same study. Needs BRAINCAM_DICOMWEB_URL and
    BRAINCAM_API_KEY (else 404 `dicomweb_disabled`); a study or series the PACS does
    not have is a 404, PACS failures answer 502 (504 on its timeout).

    Every series is analysed before anything is stored. A series whose every slice
    the out-of-distribution gate flags is stored with the verdict and warning in its
    SR and a banner on its overlay (BRAINCAM_OOD_POLICY=warn), or refuses the request
    with a 422 `out_of_distribution` naming it, nothing stored (reject)."""
    if settings.dicomweb_url is None or settings.api_key is None:
        # 404: on this server the route is not there (a 5xx would blame the server).
        raise ServiceError(
            404,
            "dicomweb_disabled",
            "POST /dicomweb/analyze is off: it needs BRAINCAM_DICOMWEB_URL (the PACS) "
            "and BRAINCAM_API_KEY (it writes to that PACS)",
        )
    try:
        response = await runtime.run(_analyse, model, settings, request)
    except OutOfDistribution:
        count_flagged(settings, metrics, "/dicomweb/analyze")
        raise
    for item in response.results:
        if item.in_distribution is False:
            count_flagged(settings, metrics, "/dicomweb/analyze")
    return json_bytes(response)
