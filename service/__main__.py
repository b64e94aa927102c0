"""`python -m service`: serve the app with uvicorn, configured by BRAINCAM_* variables."""

from __future__ import annotations

import sys

import uvicorn
from pydantic import ValidationError

from service.core.config import Settings


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"invalid BRAINCAM_* setting:\n{exc}", file=sys.stderr)
        return 2
    # An import string, not an app object: uvicorn needs one for several workers;
    # each worker process builds its own app (and loads its own model).
    uvicorn.run(
        "service.main:app",
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
