"""All routes of the API."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.routes import dicomweb, explain, health, metadata, oip, predict, series, ui
from service.security import PROTECTED

api_router = APIRouter()
# The probes (health) stay open; the rest needs X-API-Key when BRAINCAM_API_KEY is set.
api_router.include_router(predict.router, **PROTECTED)
api_router.include_router(explain.router, **PROTECTED)
api_router.include_router(series.router, **PROTECTED)  # /predict/series, /explain/series
api_router.include_router(dicomweb.router, **PROTECTED)  # POST /dicomweb/analyze
api_router.include_router(health.router)
api_router.include_router(metadata.router, **PROTECTED)
api_router.include_router(oip.router, **PROTECTED)  # POST /v2/models/{name}/infer
api_router.include_router(ui.router)  # GET /: the web page
