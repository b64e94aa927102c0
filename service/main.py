"""The FastAPI application.

`create_app(settings)` builds an app; the module-level `app` is what
`python -m service` (uvicorn) serves. Creating an app never touches the model:
it is loaded in the lifespan, in a background thread, so a missing or broken
model directory leaves a running service that says so on /health.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

import braincam
from braincam import DISCLAIMER
from service.api.main import api_router
from service.api.routes.ui import mount_static
from service.core.config import Settings
from service.errors import install_error_handlers
from service.metrics import Metrics
from service.middleware import RequestMiddleware
from service.runtime import ModelRuntime

DESCRIPTION = f"""
Explainable brain-MRI tumour classification on ONNX Runtime.

**{DISCLAIMER}**

Upload one image (PNG, JPEG, BMP, TIFF, DICOM or NIfTI) to `/predict` for a
label and class probabilities, or to `/explain` for the same plus a Grad-CAM-family
heatmap; a whole series (DICOM files, a zip, a NIfTI volume) to `/predict/series` or
`/explain/series`, optionally with DICOM results (SR + Secondary Capture).
Every error is JSON: `{{"detail": "...", "code": "..."}}`.
"""

OPENAPI_TAGS = [
    {"name": "inference", "description": "Classification and explanation."},
    {"name": "health", "description": "Liveness and readiness probes."},
    {"name": "metadata", "description": "Model metadata and Prometheus metrics."},
    {"name": "open inference protocol", "description": "KServe v2 style aliases."},
    {"name": "dicomweb", "description": "A PACS over DICOMweb: fetch, analyse, store back."},
]


def configure_logging(level: str) -> None:
    # basicConfig is a no-op when the host (uvicorn with a log config, pytest) set up
    # the root logger already; our own loggers get the configured level either way.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("service", "braincam"):
        logging.getLogger(name).setLevel(level.upper())


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.log_level)
    metrics = Metrics()
    runtime = ModelRuntime(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.start()
        try:
            yield
        finally:
            runtime.close()

    app = FastAPI(
        title="braincam",
        summary=f"Explainable brain-MRI tumour classification. {DISCLAIMER}",
        description=DESCRIPTION,
        version=braincam.__version__,
        license_info={"name": "Apache-2.0", "identifier": "Apache-2.0"},
        openapi_tags=OPENAPI_TAGS,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.runtime = runtime
    install_error_handlers(app)
    app.include_router(api_router)
    mount_static(app)
    app.add_middleware(
        RequestMiddleware,
        metrics=metrics,
        max_upload_bytes=settings.max_upload_bytes,
        series_upload_bytes=settings.max_series_upload_bytes,
    )
    if settings.cors_origin_list:
        # Added last, so outermost: error responses carry CORS headers as well.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )
    return app


app = create_app()
