"""Model metadata: /metadata, Prometheus /metrics, Open Inference Protocol /v2/models."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

import braincam
from braincam import DISCLAIMER
from braincam.cam import METHODS
from braincam.decoding import SUPPORTED_FORMATS
from braincam.model_spec import IMAGE_INPUT, PROBABILITIES_OUTPUT
from braincam.overlay import COLORMAPS
from service.api.deps import MetricsDep, ModelDep, RuntimeDep, SettingsDep
from service.api.routes.explain import DEFAULT_ALPHA, DEFAULT_COLORMAP, DEFAULT_METHOD
from service.errors import ServiceError, error_responses
from service.metrics import CONTENT_TYPE_LATEST
from service.schemas import (
    Limits,
    MetadataResponse,
    ModelMetadataV2,
    ProviderInfo,
    ReadyResponse,
    ServerMetadataV2,
    TensorMetadata,
)

router = APIRouter()


@router.get(
    "/metadata",
    response_model=MetadataResponse,
    tags=["metadata"],
    summary="The served model and what the API accepts",
    responses=error_responses(503),
)
async def metadata(model: ModelDep, settings: SettingsDep) -> MetadataResponse:
    report = model.providers
    return MetadataResponse(
        model=model.spec.model_dump(mode="json"),
        providers=ProviderInfo(
            requested=report.requested, available=report.available, active=report.active
        ),
        gpu=report.gpu,
        cam_methods=list(METHODS),
        colormaps=list(COLORMAPS),
        defaults={"method": DEFAULT_METHOD, "alpha": DEFAULT_ALPHA, "colormap": DEFAULT_COLORMAP},
        limits=Limits(
            max_upload_bytes=settings.max_upload_bytes,
            max_concurrency=settings.max_concurrency,
            formats=list(SUPPORTED_FORMATS),
        ),
        disclaimer=DISCLAIMER,
    )


@router.get(
    "/metrics",
    tags=["metadata"],
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def prometheus_metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v2", response_model=ServerMetadataV2, tags=["open inference protocol"])
async def server_metadata_v2() -> ServerMetadataV2:
    return ServerMetadataV2(name="braincam", version=braincam.__version__)


def _check_name(name: str, runtime_name: str) -> None:
    if name != runtime_name:
        raise ServiceError(404, "model_not_found", f"model {name[:64]!r} is not served here")


@router.get(
    "/v2/models/{name}",
    response_model=ModelMetadataV2,
    tags=["open inference protocol"],
    summary="Model metadata (OIP)",
    responses=error_responses(404, 503),
)
async def model_metadata_v2(name: str, model: ModelDep) -> ModelMetadataV2:
    spec = model.spec
    _check_name(name, spec.name)
    h, w, c = spec.input_shape
    return ModelMetadataV2(
        name=spec.name,
        versions=[spec.version],
        platform="onnxruntime_onnx",
        inputs=[TensorMetadata(name=IMAGE_INPUT, datatype="FP32", shape=[-1, h, w, c])],
        outputs=[
            TensorMetadata(name=PROBABILITIES_OUTPUT, datatype="FP32", shape=[-1, len(spec.labels)])
        ],
    )


@router.get(
    "/v2/models/{name}/ready",
    response_model=ReadyResponse,
    tags=["open inference protocol"],
    summary="Model readiness (OIP)",
    responses=error_responses(404),
)
async def model_ready_v2(name: str, runtime: RuntimeDep) -> JSONResponse:
    model = runtime.model
    if model is not None:
        _check_name(name, model.spec.name)
    body = ReadyResponse(ready=runtime.ready, status=runtime.status)
    return JSONResponse(body.model_dump(), status_code=200 if runtime.ready else 503)
