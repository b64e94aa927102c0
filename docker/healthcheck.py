"""Container health probe: GET /health on the local service. Standard library only,
so the images need no curl/wget.

    python healthcheck.py [URL]     (default http://127.0.0.1:$BRAINCAM_PORT/health)

Exit 0 when the service answers 200 with a JSON object whose `status` is "ok"
(the model is loaded), 1 otherwise: "loading" and "error" (the model failed to
load; /health says why) are unhealthy, and Docker ignores failures during the
health check's start period.

While the service is still starting (no answer yet, or "loading") the probe asks
again every 0.2 s for up to HEALTHCHECK_WAIT seconds (default 3.5, below the
compose file's 5 s probe timeout) before it gives up: so a container turns healthy
the moment its model is ready, not at the next probe, and Docker still runs a
probe only every 5 s. "error" and anything else unhealthy answer at once.

HEALTHCHECK_EXPECT_PROVIDER (e.g. CUDAExecutionProvider, set by the GPU compose
service) also makes the container unhealthy when that execution provider is not
among the providers the service really runs on: a GPU container that silently
fell back to the CPU (driver/CUDA/cuDNN mismatch) shows up in `docker compose ps`.

Other settings: BRAINCAM_PORT (8000), HEALTHCHECK_TIMEOUT (seconds per request, 2).
"""

from __future__ import annotations

import json
import os
import sys
import time
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


class Starting(Exception):
    """No answer yet, or the model is still loading: worth asking again."""


def probe(url: str, timeout: float, expect: str) -> str:
    """The healthy line; raises Starting, or ValueError with why it is unhealthy."""
    try:
        # urlopen raises for non-2xx answers, refused connections and timeouts.
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status = response.status
            body = json.loads(response.read().decode("utf-8"))
    except (ConnectionError, TimeoutError) as exc:
        raise Starting(f"{url}: {exc}") from exc
    except OSError as exc:  # URLError wraps a refused connection in `reason`
        if isinstance(getattr(exc, "reason", None), (ConnectionError, TimeoutError)):
            raise Starting(f"{url}: {exc}") from exc
        raise ValueError(f"{url}: {exc}") from exc
    if status != 200 or not isinstance(body, dict):
        raise ValueError(f"{url}: HTTP {status}, body is not a JSON object")
    if body.get("status") == "loading":
        raise Starting("status 'loading'")
    if body.get("status", "ok") != "ok":
        raise ValueError(f"status {body.get('status')!r}: {body.get('error') or ''}")
    providers = sorted(set(_strings(body.get("providers"))))
    if expect and expect not in providers:
        raise ValueError(f"{expect} expected, service runs on {providers or 'nothing'}")
    return f"healthy: providers {providers}"


def main(argv: list[str]) -> int:
    port = os.environ.get("BRAINCAM_PORT", "8000")
    url = argv[0] if argv else f"http://127.0.0.1:{port}/health"
    timeout = float(os.environ.get("HEALTHCHECK_TIMEOUT", "2"))
    expect = os.environ.get("HEALTHCHECK_EXPECT_PROVIDER", "").strip()
    deadline = time.monotonic() + float(os.environ.get("HEALTHCHECK_WAIT", "3.5"))
    while True:
        try:
            print(probe(url, timeout, expect))
            return 0
        except Starting as exc:
            if time.monotonic() + 0.2 >= deadline:
                print(f"unhealthy (starting): {exc}", file=sys.stderr)
                return 1
            time.sleep(0.2)
        except Exception as exc:
            print(f"unhealthy: {exc}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
