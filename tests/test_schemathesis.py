"""Property-based API fuzzing: schemathesis generates requests from the app's own
OpenAPI schema (valid and invalid ones) and checks every response: no 5xx, status
codes, content types, headers and bodies as documented. Runs in-process over ASGI
against the app serving the tiny model, with the API key on (so the `ignored_auth`
check proves the protected routes refuse requests without it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

from service.core.config import Settings
from service.main import create_app

API_KEY = "fuzz-key"
MAX_EXAMPLES = 20  # per operation and mode
# A schema cannot say "an image": a schema-valid `file` of random bytes is rightly
# refused (415/422), which this check would count as a rejected valid request.
EXCLUDED_CHECKS = [schemathesis.checks.positive_data_acceptance]


@pytest.fixture(scope="module")
def api_schema(tiny_model_dir: Path) -> Iterator[schemathesis.BaseSchema]:
    app = create_app(
        Settings(
            model_dir=tiny_model_dir,
            providers="CPUExecutionProvider",
            max_upload_mb=1,
            api_key=API_KEY,
        )
    )
    # The TestClient context runs the lifespan (loads the model); schemathesis then
    # calls the same app object over ASGI.
    with TestClient(app) as client:
        assert client.app.state.runtime.wait(120)  # type: ignore[attr-defined]
        yield schemathesis.openapi.from_asgi("/openapi.json", app)


def test_api_conforms_to_its_schema(api_schema: schemathesis.BaseSchema) -> None:
    """Every operation, valid (positive) and invalid (negative) requests."""
    calls: dict[str, int] = {}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:
        for mode in schemathesis.GenerationMode:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                derandomize=True,  # the same examples every run: failures reproduce
                suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate],  # no shrinking: report as found
                database=None,
            )
            def check(case: schemathesis.Case) -> None:
                case.call_and_validate(
                    headers={"X-API-Key": API_KEY}, excluded_checks=EXCLUDED_CHECKS
                )
                calls[case.operation.label] = calls.get(case.operation.label, 0) + 1

            try:
                check()
            except Unsatisfiable:
                # No invalid request exists for an operation without parameters.
                assert mode is schemathesis.GenerationMode.NEGATIVE, operation.label
    total = sum(calls.values())
    print(f"\nschemathesis: {total} requests over {len(calls)} operations")
    assert total >= len(operations) * 2
