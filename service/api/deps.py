"""Request dependencies. They are `async def` on purpose: FastAPI runs sync
dependencies in the thread pool, a needless hop for attribute lookups."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from braincam.inference import OnnxModel
from service.core.config import Settings
from service.metrics import Metrics
from service.runtime import ModelRuntime


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


async def get_runtime(request: Request) -> ModelRuntime:
    runtime: ModelRuntime = request.app.state.runtime
    return runtime


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RuntimeDep = Annotated[ModelRuntime, Depends(get_runtime)]


async def get_model(runtime: RuntimeDep) -> OnnxModel:
    """The loaded model, or 503 while it loads / when it failed to load."""
    return runtime.require()


ModelDep = Annotated[OnnxModel, Depends(get_model)]
