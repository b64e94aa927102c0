"""Start-up and configuration: a missing or broken model, the loading window, the
provider report, settings from the environment, CORS."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from clients import ready_client
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service import runtime as runtime_module
from service.core.config import Settings
from service.main import create_app
from service.metrics import Metrics
from service.middleware import RequestMiddleware

CPU = "CPUExecutionProvider"


def _png() -> bytes:
    ok, buf = cv2.imencode(".png", np.full((20, 30), 90, np.uint8))
    assert ok
    return buf.tobytes()


def _assert_503(res: Any, code: str) -> None:
    assert res.status_code == 503, res.text
    assert res.json()["code"] == code and set(res.json()) == {"detail", "code"}


def _assert_unavailable(client: TestClient, code: str) -> None:
    files = {"file": ("x.png", _png())}
    for path in ("/predict", "/explain"):
        _assert_503(client.post(path, files=files), code)
        # 503 wins over a bad request: there is nothing to validate against.
        _assert_503(client.post(path), code)
    _assert_503(client.get("/metadata"), code)
    _assert_503(client.get("/v2/models/anything"), code)
    for path in ("/ready", "/v2/health/ready", "/v2/models/anything/ready"):
        res = client.get(path)
        assert res.status_code == 503 and res.json()["ready"] is False, (path, res.text)
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_missing_model_dir(tmp_path: Path) -> None:
    settings = Settings(model_dir=tmp_path / "nowhere", providers=CPU)
    with TestClient(create_app(settings)) as client:
        assert client.app.state.runtime.wait(30) is False  # type: ignore[attr-defined]
        health = client.get("/health")
        assert health.status_code == 200
        body = health.json()
        assert body["status"] == "error" and body["ready"] is False and body["model"] is None
        assert "does not exist" in body["error"] and str(tmp_path) not in body["error"]
        _assert_unavailable(client, "model_unavailable")
        assert "could not be loaded" in client.post("/predict").json()["detail"]


@pytest.mark.parametrize("damage", ["no_model_json", "bad_sha256", "bad_json", "bad_graph"])
def test_broken_model_dir(tiny_model_dir: Path, tmp_path: Path, damage: str) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    if damage == "no_model_json":
        (model_dir / "model.json").unlink()
    elif damage == "bad_sha256":
        with (model_dir / "gradcam.onnx").open("ab") as fh:
            fh.write(b"\0")
    elif damage == "bad_json":
        (model_dir / "model.json").write_text('{"name": "x"}')
    else:  # a graph ORT cannot load, with a matching sha256 (re-recorded)
        from braincam.model_spec import load_spec, save_spec, sha256_file

        (model_dir / "classifier.onnx").write_bytes(b"not an onnx graph")
        spec = load_spec(model_dir, verify=False)
        spec.graphs.classifier.sha256 = sha256_file(model_dir / "classifier.onnx")
        save_spec(spec, model_dir)
    with TestClient(create_app(Settings(model_dir=model_dir, providers=CPU))) as client:
        assert client.app.state.runtime.wait(60) is False  # type: ignore[attr-defined]
        body = client.get("/health").json()
        assert body["status"] == "error" and body["error"]
        assert str(tmp_path) not in body["error"], body["error"]
        _assert_unavailable(client, "model_unavailable")


@pytest.fixture
def slow_model(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """OnnxModel that blocks until released, then fails: the loading window, held open."""
    release = threading.Event()

    class Blocked:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            release.wait(30)
            raise RuntimeError("released")

    monkeypatch.setattr(runtime_module, "OnnxModel", Blocked)
    yield release
    release.set()


def test_health_answers_while_the_model_loads(tmp_path: Path, slow_model: threading.Event) -> None:
    with TestClient(create_app(Settings(model_dir=tmp_path, providers=CPU))) as client:
        body = client.get("/health").json()
        assert body["status"] == "loading" and body["ready"] is False and body["error"] is None
        assert client.get("/ready").json() == {"ready": False, "status": "loading"}
        res = client.post("/predict", files={"file": ("x.png", _png())})
        _assert_503(res, "model_loading")
        assert res.headers["retry-after"] == "1"
        _assert_unavailable(client, "model_loading")
        slow_model.set()
        assert client.app.state.runtime.wait(30) is False  # type: ignore[attr-defined]
        assert client.get("/health").json()["error"] == "RuntimeError: released"


def test_without_lifespan_nothing_is_loaded(tiny_model_dir: Path) -> None:
    """create_app alone (no start-up) touches no model; requests get 503, not 500."""
    client = TestClient(create_app(Settings(model_dir=tiny_model_dir, providers=CPU)))
    assert client.get("/health").json()["status"] == "loading"
    _assert_503(client.post("/predict", files={"file": ("x.png", _png())}), "model_loading")


def test_unavailable_cuda_is_reported(tiny_model_dir: Path) -> None:
    import onnxruntime as ort

    settings = Settings(model_dir=tiny_model_dir)  # default: CUDA first, then CPU
    assert settings.provider_list == ["CUDAExecutionProvider", CPU]
    with ready_client(settings) as client:
        body = client.get("/health").json()
        assert body["execution_providers"]["requested"] == ["CUDAExecutionProvider", CPU]
        assert body["providers"] == body["execution_providers"]["active"]
        if "CUDAExecutionProvider" in ort.get_available_providers() and body["gpu"]:
            assert body["providers"][0] == "CUDAExecutionProvider"
        else:
            assert body["gpu"] is False and body["providers"] == [CPU]
            assert any("CUDAExecutionProvider" in w for w in body["warnings"])
        assert client.post("/predict", files={"file": ("x.png", _png())}).status_code == 200


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "BRAINCAM_MODEL_DIR": "/srv/models/x",
        "BRAINCAM_PROVIDERS": " CPUExecutionProvider , CUDAExecutionProvider,",
        "BRAINCAM_MAX_UPLOAD_MB": "2.5",
        "BRAINCAM_INTRA_OP_THREADS": "3",
        "BRAINCAM_HOST": "0.0.0.0",
        "BRAINCAM_PORT": "9001",
        "BRAINCAM_WORKERS": "2",
        "BRAINCAM_CORS_ORIGINS": "https://a.example,https://b.example",
        "BRAINCAM_LOG_LEVEL": "DEBUG",
        "BRAINCAM_PNG_COMPRESSION": "6",
        "BRAINCAM_MAX_CONCURRENCY": "8",
        "BRAINCAM_ORT_SPINNING": "true",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = Settings()
    assert s.model_dir == Path("/srv/models/x")
    assert s.provider_list == [CPU, "CUDAExecutionProvider"]
    assert s.max_upload_bytes == int(2.5 * 2**20)
    assert (s.intra_op_threads, s.host, s.port, s.workers) == (3, "0.0.0.0", 9001, 2)
    assert s.cors_origin_list == ["https://a.example", "https://b.example"]
    assert (s.log_level, s.png_compression, s.max_concurrency) == ("debug", 6, 8)
    assert s.ort_spinning is True
    for key in env:
        monkeypatch.setenv(key, "")  # empty means unset: the defaults
    d = Settings()
    assert d.model_dir == Path("models/demo") and d.cors_origin_list == []
    assert d.provider_list == ["CUDAExecutionProvider", CPU]
    assert (d.max_upload_bytes, d.intra_op_threads, d.port) == (20 * 2**20, 0, 8000)
    assert (d.host, d.workers, d.png_compression, d.log_level) == ("127.0.0.1", 1, None, "info")
    assert d.ort_spinning is False
    for key, bad in [
        ("BRAINCAM_PNG_COMPRESSION", "12"),
        ("BRAINCAM_MAX_UPLOAD_MB", "0"),
        ("BRAINCAM_MAX_CONCURRENCY", "0"),
        ("BRAINCAM_LOG_LEVEL", "loud"),
    ]:
        monkeypatch.setenv(key, bad)
        with pytest.raises(ValidationError):
            Settings()
        monkeypatch.delenv(key)


def test_served_sessions_take_the_thread_settings(tiny_model_dir: Path) -> None:
    """ORT threads stop spin-waiting by default (several requests share the cores)."""
    key = "session.intra_op.allow_spinning"
    for settings, spinning, threads in [
        (Settings(model_dir=tiny_model_dir), "0", 0),
        (Settings(model_dir=tiny_model_dir, ort_spinning=True, intra_op_threads=1), "1", 1),
    ]:
        with TestClient(create_app(settings)) as client:
            runtime = client.app.state.runtime  # type: ignore[attr-defined]
            assert runtime.wait(60)
            model = runtime.model
            for session in (model.classifier, model.gradcam_session):
                options = session.get_session_options()
                assert options.get_session_config_entry(key) == spinning
                assert options.intra_op_num_threads == threads


def test_cors(tmp_path: Path) -> None:
    origin = "https://viewer.example"
    settings = Settings(model_dir=tmp_path, providers=CPU, cors_origins=[origin])
    with TestClient(create_app(settings)) as client:
        preflight = client.options(
            "/predict",
            headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == origin
        # Error responses carry the header too (CORS is the outermost middleware).
        res = client.post("/predict", headers={"Origin": origin})
        assert res.status_code == 503
        assert res.headers["access-control-allow-origin"] == origin
        other = client.get("/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    # No origins configured: no CORS headers at all.
    with TestClient(create_app(Settings(model_dir=tmp_path, providers=CPU))) as client:
        res = client.get("/health", headers={"Origin": origin})
        assert "access-control-allow-origin" not in res.headers


def test_unexpected_errors_are_a_generic_500(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from service import pipeline

    def boom(*args: Any) -> Any:
        raise RuntimeError("secret detail at /srv/internal/path")

    with ready_client(Settings(model_dir=tiny_model_dir, providers=CPU)) as client:
        monkeypatch.setattr(pipeline, "predict", boom)  # after the warm-up, which uses it
        res = client.post("/predict", files={"file": ("x.png", _png())})
        assert res.status_code == 500
        assert res.json() == {"detail": "internal error", "code": "internal_error"}
        assert "secret detail" in caplog.text  # logged with its traceback, not returned
        assert "Traceback" in caplog.text
        # The worker survives.
        assert client.get("/health").json()["status"] == "ok"
        metrics = client.get("/metrics").text
        assert 'braincam_errors_total{code="internal_error",status="500"} 1.0' in metrics


def test_body_limit_survives_a_parser_that_swallows_errors() -> None:
    """Whatever the body reader makes of the limit's exception, the client gets 413."""
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> JSONResponse:
        try:
            body = await request.body()
        except Exception:  # a parser turning every failure into a 400
            return JSONResponse({"detail": "bad body", "code": "bad_request"}, status_code=400)
        return JSONResponse({"size": len(body)})

    app.add_middleware(RequestMiddleware, metrics=Metrics(), max_upload_bytes=1000)
    client = TestClient(app)

    def chunks(n: int) -> Iterator[bytes]:
        for _ in range(n):
            yield bytes(16 * 1024)

    assert client.post("/echo", content=chunks(1)).json() == {"size": 16 * 1024}
    res = client.post("/echo", content=chunks(8))  # streamed: no Content-Length
    assert res.status_code == 413 and res.json()["code"] == "payload_too_large"
    res = client.post("/echo", content=bytes(200_000))  # declared: refused up front
    assert res.status_code == 413 and res.json()["code"] == "payload_too_large"
