"""Liveness and readiness, plus their Open Inference Protocol aliases.

All `async def`: they never wait for a worker thread, so they answer however
busy the model is.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

import braincam
from service.api.deps import RuntimeDep
from service.runtime import ModelRuntime
from service.schemas import HealthResponse, LiveResponse, ModelRef, ProviderInfo, ReadyResponse

router = APIRouter(tags=["health"])

_NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {"model": ReadyResponse, "description": "Model loading or failed to load"}
}


@router.get("/health", response_model=HealthResponse, summary="Liveness and model status")
async def health(runtime: RuntimeDep) -> HealthResponse:
    """Always 200 while the process lives; says whether the model loaded, where it
    runs (execution providers really in use) and why not, if it failed."""
    model = runtime.model
    if model is None:
        return HealthResponse(
            status=runtime.status,
            ready=False,
            error=runtime.error,
            version=braincam.__version__,
        )
    report = model.providers
    return HealthResponse(
        status="ok",
        ready=True,
        model=ModelRef(name=model.spec.name, version=model.spec.version, notice=model.spec.notice),
        providers=list(report.active),
        execution_providers=ProviderInfo(
            requested=report.requested, available=report.available, active=report.active
        ),
        gpu=report.gpu,
        warnings=list(report.warnings),
        load_seconds=runtime.load_seconds,
        version=braincam.__version__,
    )


def _ready(runtime: ModelRuntime) -> JSONResponse:
    body = ReadyResponse(ready=runtime.ready, status=runtime.status)
    return JSONResponse(body.model_dump(), status_code=200 if runtime.ready else 503)


@router.get("/ready", response_model=ReadyResponse, responses=_NOT_READY, summary="Readiness")
async def ready(runtime: RuntimeDep) -> JSONResponse:
    """200 once the model is loaded and warmed up, 503 before (or if it failed)."""
    return _ready(runtime)


@router.get("/v2/health/live", response_model=LiveResponse, summary="Liveness (OIP)")
async def live_v2() -> LiveResponse:
    return LiveResponse(live=True)


@router.get(
    "/v2/health/ready",
    response_model=ReadyResponse,
    responses=_NOT_READY,
    summary="Readiness (OIP)",
)
async def ready_v2(runtime: RuntimeDep) -> JSONResponse:
    return _ready(runtime)
