"""All routes of the API."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.routes import explain, health, metadata, oip, predict, ui

api_router = APIRouter()
api_router.include_router(predict.router)
api_router.include_router(explain.router)
api_router.include_router(health.router)
api_router.include_router(metadata.router)
api_router.include_router(oip.router)  # POST /v2/models/{name}/infer
api_router.include_router(ui.router)  # GET /: the web page
