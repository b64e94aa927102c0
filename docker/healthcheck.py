"""Container health probe: GET /health on the local service. Standard library only,
so the images need no curl/wget.

    python healthcheck.py [URL]     (default http://127.0.0.1:$BRAINCAM_PORT/health)

Exit 0 when the service answers 200 with a JSON object whose `status` is "ok"
(the model is loaded), 1 otherwise: "loading" and "error" (the model failed to
load; /health says why) are unhealthy, and Docker ignores failures during the
health check's start period.

HEALTHCHECK_EXPECT_PROVIDER (e.g. CUDAExecutionProvider, set by the GPU compose
service) also makes the container unhealthy when that execution provider is not
among the providers the service really runs on: a GPU container that silently
fell back to the CPU (driver/CUDA/cuDNN mismatch) shows up in `docker compose ps`.

Other settings: BRAINCAM_PORT (8000), HEALTHCHECK_TIMEOUT (seconds, 4).
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any


def _strings(value: Any) -> Iterator[str]:
    """Every string in a JSON value: `providers` may be a list or a per-graph mapping."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def main(argv: list[str]) -> int:
    port = os.environ.get("BRAINCAM_PORT", "8000")
    url = argv[0] if argv else f"http://127.0.0.1:{port}/health"
    timeout = float(os.environ.get("HEALTHCHECK_TIMEOUT", "4"))
    expect = os.environ.get("HEALTHCHECK_EXPECT_PROVIDER", "").strip()
    try:
        # urlopen raises for non-2xx answers, refused connections and timeouts.
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status = response.status
            body = json.loads(response.read().decode("utf-8"))
    except Exception as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200 or not isinstance(body, dict):
        print(f"unhealthy: {url}: HTTP {status}, body is not a JSON object", file=sys.stderr)
        return 1
    if body.get("status", "ok") != "ok":
        print(
            f"unhealthy: status {body.get('status')!r}: {body.get('error') or ''}", file=sys.stderr
        )
        return 1
    providers = sorted(set(_strings(body.get("providers"))))
    if expect and expect not in providers:
        print(
            f"unhealthy: {expect} expected, service runs on {providers or 'nothing'}",
            file=sys.stderr,
        )
        return 1
    print(f"healthy: providers {providers}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
