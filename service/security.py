"""Optional API key: the `X-API-Key` header, checked when BRAINCAM_API_KEY is set.

Off by default (the service binds 127.0.0.1). The probes (/health, /ready,
/v2/health/*) never require it: orchestrators call them without credentials. The
OpenAPI schema always declares the scheme on the protected routes, so clients and
fuzzers know where a key goes.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import Depends, Security
from fastapi.security import APIKeyHeader

from service.api.deps import SettingsDep
from service.errors import ServiceError, error_responses

API_KEY_HEADER = "X-API-Key"

# auto_error=False: a missing header must not be FastAPI's 403 with its own body;
# the check below answers 401 in the service's error shape, and only when enabled.
_scheme = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    scheme_name="APIKey",
    description="Required on every route except the health probes when the server "
    "sets BRAINCAM_API_KEY.",
)


class Unauthorized(ServiceError):
    def __init__(self) -> None:
        super().__init__(
            401,
            "unauthorized",
            f"missing or invalid API key ({API_KEY_HEADER} header)",
            {"WWW-Authenticate": API_KEY_HEADER},
        )


async def require_api_key(
    settings: SettingsDep, supplied: str | None = Security(_scheme)
) -> None:
    expected = settings.api_key
    if expected is None:
        return
    # Compare bytes in constant time: a str compare_digest rejects non-ASCII input
    # with a TypeError, and `==` leaks the length of the matching prefix. Starlette
    # decodes header bytes as latin-1, so this recovers the bytes that were sent.
    given = (supplied or "").encode("latin-1", "replace")
    if not hmac.compare_digest(given, expected.get_secret_value().encode("utf-8")):
        raise Unauthorized()


# For `include_router(..., **PROTECTED)`: the check and its documented 401.
PROTECTED: dict[str, Any] = {
    "dependencies": [Depends(require_api_key)],
    "responses": error_responses(401),
}
