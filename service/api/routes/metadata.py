"""Model metadata: /metadata, Prometheus /metrics, Open Inference Protocol /v2/models."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

import braincam
from braincam import DISCLAIMER
from braincam.cam import available_methods, default_method
from braincam.decoding import SUPPORTED_FORMATS
from braincam.explainers import attribution_methods, cam_layers
from braincam.overlay import COLORMAPS
from service.api.deps import MetricsDep, ModelDep, RuntimeDep, SettingsDep
from service.api.routes.explain import DEFAULT_ALPHA, DEFAULT_COLORMAP
from service.errors import error_responses
from service.inference_protocol import TensorSpec, find_model
from service.metrics import CONTENT_TYPE_LATEST
from service.schemas import (
    BatchingInfo,
    Limits,
    MetadataResponse,
    ModelMetadataV2,
    OodInfo,
    ProviderInfo,
    ReadyResponse,
    ServerMetadataV2,
    TensorMetadata,
)

router = APIRouter()

OOD_DESCRIPTIONS = {
    "mahalanobis": "Mahalanobis distance of the image's features (graph tensor {features}, "
    "{dim} values) to the nearest class mean, under a Ledoit-Wolf-shrunk covariance "
    "fitted on in-distribution images",
    "energy": "energy score: minus the log-sum-exp of the pre-softmax class scores",
}


@router.get(
    "/metadata",
    response_model=MetadataResponse,
    tags=["metadata"],
    summary="The served model and what the API accepts",
    responses=error_responses(503),
)
async def metadata(
    model: ModelDep, runtime: RuntimeDep, settings: SettingsDep
) -> MetadataResponse:
    report = model.providers
    spec = model.spec
    ood = None
    if spec.ood is not None:
        o = spec.ood
        ood = OodInfo(
            detector=o.detector,
            threshold=o.threshold,
            policy=settings.ood_policy,
            target_pass_rate=o.target_pass_rate,
            held_out_pass_rate=o.held_out_pass_rate,
            fit_size=o.fit_size,
            held_out_size=o.held_out_size,
            fit_data=o.fit_data,
            description=OOD_DESCRIPTIONS.get(o.detector, o.detector).format(
                features=o.features, dim=o.feature_dim
            ),
        )
    methods = available_methods(model.has_gradcam, settings.occlusion)
    methods += [m for m in attribution_methods(model) if m not in methods]
    return MetadataResponse(
        model=spec.model_dump(mode="json"),
        out_of_distribution=ood,
        temperature=spec.calibration.temperature if spec.calibration else None,
        providers=ProviderInfo(
            requested=report.requested, available=report.available, active=report.active
        ),
        gpu=report.gpu,
        batching=BatchingInfo(
            setting=settings.batching,
            active=runtime.batchers is not None,
            reason=runtime.batching_reason,
            max_size=settings.batch_max_size,
            max_wait_ms=settings.batch_max_wait_ms,
        ),
        cam_methods=methods,
        cam_layers=cam_layers(model),
        colormaps=list(COLORMAPS),
        defaults={
            "method": default_method(model.has_gradcam),
            "alpha": DEFAULT_ALPHA,
            "colormap": DEFAULT_COLORMAP,
        },
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


def _tensor(t: TensorSpec) -> TensorMetadata:
    return TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape)


@router.get(
    "/v2/models/{name}",
    response_model=ModelMetadataV2,
    tags=["open inference protocol"],
    summary="Model metadata (OIP)",
    responses=error_responses(404, 503),
)
async def model_metadata_v2(name: str, model: ModelDep) -> ModelMetadataV2:
    """`NAME` is the classifier, `NAME-gradcam` the Grad-CAM graph; tensors as the
    graphs declare them (-1: the batch)."""
    found = find_model(model, name)
    return ModelMetadataV2(
        name=found.name,
        versions=[found.version],
        platform="onnxruntime_onnx",
        inputs=[_tensor(t) for t in found.inputs],
        outputs=[_tensor(t) for t in found.outputs],
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
        find_model(model, name)
    body = ReadyResponse(ready=runtime.ready, status=runtime.status)
    return JSONResponse(body.model_dump(), status_code=200 if runtime.ready else 503)
