"""Pure ASGI middleware: request metrics, the request-body bound, the catch-all 500.

Pure ASGI (not BaseHTTPMiddleware) so the body can be counted as it streams in
and nothing is buffered here.
"""

from __future__ import annotations

import json
import logging
import time

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.config import MULTIPART_OVERHEAD_BYTES
from service.metrics import Metrics

log = logging.getLogger(__name__)

# On every response: no MIME sniffing of our JSON (an echoed file name cannot turn
# into HTML), and no caching of results derived from patient images.
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
)


# Routes whose body is a whole series (settings.max_series_upload_mb bounds it).
SERIES_PATHS = frozenset({"/predict/series", "/explain/series"})


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` when the body outgrows its bound; FastAPI re-raises
    HTTPExceptions from body parsing, so it reaches the exception handlers intact."""

    code = "payload_too_large"

    def __init__(self, max_upload_bytes: int) -> None:
        super().__init__(413, upload_limit_message(max_upload_bytes))


def upload_limit_message(max_upload_bytes: int) -> str:
    return f"the upload exceeds the {max_upload_bytes / 2**20:.4g} MiB limit"


class RequestMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        max_upload_bytes: int,
        series_upload_bytes: int | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_upload_bytes = max_upload_bytes
        # The file is bounded exactly where it is read (uploads.read_upload); the body
        # bound adds room for the multipart envelope and the small form fields.
        self.max_body_bytes = max_upload_bytes + MULTIPART_OVERHEAD_BYTES
        # Whole-series uploads (many files, or one zip) have their own, larger bound.
        self.series_upload_bytes = series_upload_bytes or max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        response_started = False
        too_large = False
        received = 0
        upload_bytes, limit = self.max_upload_bytes, self.max_body_bytes
        if scope.get("path", "") in SERIES_PATHS:
            # Room for the part headers of up to a few thousand files.
            upload_bytes = self.series_upload_bytes
            limit = upload_bytes + 16 * MULTIPART_OVERHEAD_BYTES

        replaced = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, response_started, replaced
            if replaced:
                return
            if message["type"] == "http.response.start":
                if too_large and message["status"] != 413:
                    # The body parser turned our exception into another error
                    # (some FastAPI versions answer 400): the truth is 413.
                    replaced = True
                    await reply(413, BodyTooLarge.code, BodyTooLarge(upload_bytes).detail)
                    return
                status = message["status"]
                response_started = True
                message = {**message, "headers": _with_security_headers(message)}
            await send(message)

        async def receive_wrapper() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    raise BodyTooLarge(upload_bytes)
            return message

        async def reply(code_status: int, code: str, detail: str) -> None:
            nonlocal status, response_started
            self.metrics.error(code_status, code)
            body = json.dumps({"detail": detail, "code": code}).encode()
            status, response_started = code_status, True
            await send(
                {
                    "type": "http.response.start",
                    "status": code_status,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                        *SECURITY_HEADERS,
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})

        try:
            declared = _content_length(scope)
            if declared is not None and declared > limit:
                # Refused before a byte of the body is read.
                await reply(413, BodyTooLarge.code, BodyTooLarge(upload_bytes).detail)
                return
            await self.app(scope, receive_wrapper, send_wrapper)
        except Exception:
            if response_started:
                log.exception(
                    "error after the response started: %s %s", scope["method"], scope["path"]
                )
                raise
            if too_large:
                await reply(413, BodyTooLarge.code, BodyTooLarge(upload_bytes).detail)
            else:
                # The one place tracebacks go: the log, never the client.
                log.exception("unhandled error: %s %s", scope["method"], scope["path"])
                await reply(500, "internal_error", "internal error")
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(
                endpoint=endpoint, method=scope["method"], status=str(status)
            ).inc()
            self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - started)


def _with_security_headers(message: Message) -> list[tuple[bytes, bytes]]:
    headers = list(message.get("headers", ()))
    present = {name.lower() for name, _ in headers}
    headers.extend(item for item in SECURITY_HEADERS if item[0] not in present)
    return headers


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
