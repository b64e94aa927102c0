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
from braincam.inference import OnnxModel
from braincam.model_spec import IMAGE_INPUT, OOD_SCORE_OUTPUT, PROBABILITIES_OUTPUT
from service.api.deps import MetricsDep, RuntimeDep
from service.batching import ModelBatchers
from service.errors import ServiceError, error_responses
from service.inference_protocol import (
    HEADER_LENGTH,
    Encoded,
    encode_outputs,
    prepare_inference,
    run_inference,
    run_prepared,
)
from service.runtime import ModelRuntime

router = APIRouter(tags=["open inference protocol"])

# What the classifier's micro-batcher returns; a call asking for another output of the
# graph runs on its own.
BATCHED_OUTPUTS = frozenset({PROBABILITIES_OUTPUT, OOD_SCORE_OUTPUT})

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
        request_headers = dict(request.headers)
        batchers = runtime.batchers
        if batchers is None:
            encoded = await runtime.run(
                run_inference, model, metrics, name, version, body, request_headers
            )
        else:
            encoded = await _batched(
                runtime, batchers, model, name, version, body, request_headers
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


async def _batched(
    runtime: ModelRuntime,
    batchers: ModelBatchers,
    model: OnnxModel,
    name: str,
    version: str | None,
    body: bytes,
    headers: dict[str, str],
) -> Encoded:
    """Classifier calls share the micro-batcher's runs with /predict; the Grad-CAM
    graph runs alone, as /explain's does."""
    prepared = await runtime.run(prepare_inference, model, name, version, body, headers)
    wanted = {out.name for out in prepared.requested}
    if prepared.target.graph != "classifier" or not wanted <= BATCHED_OUTPUTS:
        return await runtime.run(run_prepared, model, runtime.metrics, prepared)
    outputs = await batchers.classifier.submit(prepared.feeds[IMAGE_INPUT])
    produced = dict(zip((PROBABILITIES_OUTPUT, OOD_SCORE_OUTPUT), outputs, strict=False))
    arrays = [produced[out.name] for out in prepared.requested]
    return await runtime.run(encode_outputs, prepared, arrays)


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
