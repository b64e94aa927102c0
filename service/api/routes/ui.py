"""The web page: `GET /` and its assets under `/static`, plain files shipped in the package.

No build step and no CDN: the page works offline, and its Content-Security-Policy
allows nothing but this origin (images from `blob:` URLs the page makes itself).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"
STATIC_PATH = "/static"

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# Revalidate on every load (a cheap 304 via ETag): a new release is never mixed
# with a cached app.js from the previous one. (RequestMiddleware adds `nosniff` to
# every response, and `no-store` only where a route set no Cache-Control.)
_CACHE = "no-cache"

router = APIRouter(include_in_schema=False)


@router.api_route("/", methods=["GET", "HEAD"])
async def index() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type="text/html; charset=utf-8",
        headers={
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "Cache-Control": _CACHE,
            "Referrer-Policy": "no-referrer",
        },
    )


class _Assets(StaticFiles):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (b"cache-control", _CACHE.encode()),
                ]
            await send(message)

        await super().__call__(scope, receive, send_with_headers)


def mount_static(app: FastAPI) -> None:
    """Serve the page's assets; unknown files get the API's JSON 404."""
    app.mount(STATIC_PATH, _Assets(directory=STATIC_DIR), name="static")
