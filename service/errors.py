"""Exception handlers: every error leaves as JSON `{"detail": ..., "code": ...}`.

Bad input never becomes a 500, and nothing internal (traceback, file path) reaches
the client; unexpected exceptions are caught by `middleware.RequestMiddleware`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from braincam.errors import InputError
from service.schemas import ErrorResponse

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
    503: "service_unavailable",
}


class ServiceError(Exception):
    """An error of the service itself (not of the input) with its HTTP status."""

    def __init__(
        self,
        status_code: int,
        code: str,
        detail: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.code = code
        self.detail = detail
        self.headers = dict(headers or {})


class ModelUnavailable(ServiceError):
    def __init__(self, detail: str, code: str, retry_after: int | None = None) -> None:
        headers = {"Retry-After": str(retry_after)} if retry_after else None
        super().__init__(503, code, detail, headers)


class RequestTimeout(ServiceError):
    """The request's blocking work (queue wait, decoding, inference) passed its deadline."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            503,
            "request_timeout",
            f"the request took longer than {timeout_s:g} s (BRAINCAM_REQUEST_TIMEOUT_S); "
            "the service is busy or the image is very large",
            {"Retry-After": "1"},
        )


def error_json(
    status_code: int,
    code: str,
    detail: str,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse({"detail": detail, "code": code}, status_code, headers=headers)


def _count(request: Request, status_code: int, code: str) -> None:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.error(status_code, code)


def describe_validation_errors(errors: Sequence[Any]) -> str:
    """FastAPI's error list -> one line such as `alpha: Input should be ...`.

    The offending input values are not echoed: they can be large or binary.
    """
    parts = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        field = ".".join(loc) or "request"
        parts.append(f"{field}: {err.get('msg', 'invalid value')}")
    return "; ".join(parts) or "invalid request"


async def _input_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InputError)
    _count(request, exc.status_code, exc.code)
    return error_json(exc.status_code, exc.code, exc.detail)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    _count(request, exc.status_code, exc.code)
    return error_json(exc.status_code, exc.code, exc.detail, exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    _count(request, 422, "validation_error")
    return error_json(422, "validation_error", describe_validation_errors(exc.errors()))


# Starlette's multipart parser refuses more files than its limit as a 400 with this
# message; that bounds the upload's size, so it is answered as one (413). Too many
# plain form fields stay a 400: no upload is that large, the form is malformed.
_TOO_MANY_FILES = re.compile(r"Too many files\. Maximum number of files is (\d+)")


def _too_many_files(request: Request, exc: StarletteHTTPException) -> str | None:
    match = _TOO_MANY_FILES.match(exc.detail) if isinstance(exc.detail, str) else None
    if exc.status_code != 400 or match is None:
        return None
    (limit,) = match.groups()
    settings = getattr(request.app.state, "settings", None)
    zip_limit = getattr(settings, "max_zip_entries", None)
    return (
        f"the upload has more than {limit} files, the limit of one multipart request; "
        "send a series of more files as one zip"
        + (f" (up to {zip_limit} files, BRAINCAM_MAX_ZIP_ENTRIES)" if zip_limit else "")
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    too_many = _too_many_files(request, exc)
    if too_many is not None:
        _count(request, 413, "payload_too_large")
        return error_json(413, "payload_too_large", too_many)
    code = getattr(exc, "code", None) or _HTTP_CODES.get(exc.status_code, "http_error")
    detail = exc.detail if isinstance(exc.detail, str) else "request failed"
    _count(request, exc.status_code, code)
    return error_json(exc.status_code, code, detail, exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(InputError, _input_error)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)


# OpenAPI `responses=` entries, shared by the routes.
def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "Malformed request body",
        401: "Missing or wrong X-API-Key (only when BRAINCAM_API_KEY is set)",
        404: "Unknown model name",
        413: "Upload larger than BRAINCAM_MAX_UPLOAD_MB, or an image over "
        "BRAINCAM_MAX_IMAGE_PIXELS (read from its header)",
        415: "Unsupported or unrecognised file type",
        422: "Undecodable image or invalid parameter",
        500: "Internal error (details are logged, never returned)",
        502: "The PACS refused the request or could not be reached (DICOMweb routes)",
        503: "Model not loaded (still loading, or failed to load: see /health), "
        "or the request passed BRAINCAM_REQUEST_TIMEOUT_S",
        504: "The PACS did not answer in time (DICOMweb routes)",
    }
    examples = {
        400: ("There was an error parsing the body", "bad_request"),
        401: ("missing or invalid API key (X-API-Key header)", "unauthorized"),
        404: ("model 'other' is not served here", "model_not_found"),
        413: ("the upload exceeds the 20 MiB limit", "payload_too_large"),
        415: ("unrecognised file type: send PNG, JPEG, ...", "unsupported_media_type"),
        422: ("could not decode the PNG image", "undecodable_image"),
        500: ("internal error", "internal_error"),
        502: ("the PACS answered 500 to store", "pacs_error"),
        503: ("the model is still loading", "model_loading"),
        504: ("the PACS did not answer in time (series)", "pacs_timeout"),
    }
    return {
        status: {
            "model": ErrorResponse,
            "description": descriptions[status],
            "content": {
                "application/json": {
                    "example": {"detail": examples[status][0], "code": examples[status][1]}
                }
            },
        }
        for status in statuses
    }
