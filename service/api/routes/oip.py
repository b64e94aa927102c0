"""Open Inference Protocol inference: POST /v2/models/{name}[/versions/{version}]/infer.

The request and its tensors are described in service/inference_protocol.py and
docs/api.md. Errors carry OIP's `error` field (what KServe and Triton clients
read) beside this API's `detail` and `code`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from braincam.errors import InputError
from service.api.deps import MetricsDep, RuntimeDep
from service.errors import ServiceError, error_responses
from service.inference_protocol import HEADER_LENGTH, run_inference

router = APIRouter(tags=["open inference protocol"])

_EXAMPLE = {
    "id": "42",
    "inputs": [
        {"name": "image", "shape": [1, 150, 150, 1], "datatype": "FP32", "data": [0.0, 0.1]}
    ],
    "outputs": [{"name": "probabilities"}],
}
_RESPONSE_EXAMPLE = {
    "model_name": "demo",
    "model_version": "1",
    "id": "42",
    "outputs": [
        {
            "name": "probabilities",
            "datatype": "FP32",
            "shape": [1, 4],
            "data": [0.93, 0.04, 0.01, 0.02],
        }
    ],
}
_DOC: dict[str, Any] = {
    "summary": "Inference on tensors (Open Inference Protocol v2)",
    "responses": {
        200: {"content": {"application/json": {"example": _RESPONSE_EXAMPLE}}},
        **error_responses(404, 413, 503),
        400: {
            "description": "Invalid inference request (names, datatypes, shapes, data)",
            "content": {
                "application/json": {
                    "example": {
                        "error": "input 'image' has datatype 'FP64'; the model expects FP32",
                        "detail": "input 'image' has datatype 'FP64'; the model expects FP32",
                        "code": "invalid_inference_request",
                    }
                }
            },
        },
    },
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"example": _EXAMPLE}},
        }
    },
}


async def _infer(
    request: Request, runtime: RuntimeDep, metrics: MetricsDep, name: str, version: str | None
) -> Response:
    try:
        model = runtime.require()
        # The body is bounded by RequestMiddleware (BRAINCAM_MAX_UPLOAD_MB).
        body = await request.body()
        encoded = await runtime.run(
            run_inference, model, metrics, name, version, body, dict(request.headers)
        )
    except (ServiceError, InputError) as exc:
        metrics.error(exc.status_code, exc.code)
        headers = getattr(exc, "headers", None)
        return JSONResponse(
            {"error": exc.detail, "detail": exc.detail, "code": exc.code},
            exc.status_code,
            headers=headers,
        )
    if encoded.header_length is None:
        return Response(encoded.body, media_type="application/json")
    return Response(
        encoded.body,
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(encoded.header_length)},
    )


@router.post("/v2/models/{name}/infer", **_DOC)
async def infer(request: Request, name: str, runtime: RuntimeDep, metrics: MetricsDep) -> Response:
    """Tensors in, tensors out. Models: `NAME` (the classifier: `image` FP32
    [N,H,W,C], preprocessed as model.json says -> `probabilities`) and
    `NAME-gradcam` (`image`, `target` INT64 [N] -> `probabilities`, `class_index`,
    `activations`, `gradients`). JSON `data` or binary tensor data."""
    return await _infer(request, runtime, metrics, name, None)


@router.post("/v2/models/{name}/versions/{version}/infer", **_DOC)
async def infer_version(
    request: Request, name: str, version: str, runtime: RuntimeDep, metrics: MetricsDep
) -> Response:
    """As `/v2/models/{name}/infer`, for an explicit version (the one served)."""
    return await _infer(request, runtime, metrics, name, version)
