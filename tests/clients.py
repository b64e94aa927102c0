"""The service under test: a TestClient on a fresh app whose model finished loading."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from fastapi.testclient import TestClient

from service.core.config import Settings
from service.main import create_app


@contextmanager
def ready_client(settings: Settings, timeout_s: float = 120.0) -> Iterator[TestClient]:
    """Enter the app's lifespan and wait for the model; a load that fails shows /health."""
    with TestClient(create_app(settings)) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        assert runtime.wait(timeout_s), client.get("/health").json()
        yield client
