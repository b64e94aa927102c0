"""`python -m service` as a real uvicorn process: start-up from BRAINCAM_* variables,
real HTTP uploads (including oversized and streamed ones), clean shutdown."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from service.local_server import serve


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    settings = {"BRAINCAM_MAX_UPLOAD_MB": "1", "BRAINCAM_LOG_LEVEL": "info"}
    with serve(tiny_model_dir, settings, log) as live:
        yield live.url
    text = log.read_text()
    # Recent uvicorn re-raises the signal after a graceful shutdown: -SIGTERM.
    assert live.process.returncode in (0, -signal.SIGTERM), text
    assert "Application shutdown complete" in text, text
    assert "Traceback" not in text, text


def _png(h: int = 40, w: int = 50) -> bytes:
    ok, buf = cv2.imencode(".png", np.tile(np.arange(w, dtype=np.uint8) * 5, (h, 1)))
    assert ok
    return buf.tobytes()


def test_real_server(server: str) -> None:
    with httpx.Client(base_url=server, timeout=60) as client:
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["providers"] == ["CPUExecutionProvider"]
        res = client.post("/predict", files={"file": ("a.png", _png())})
        assert res.status_code == 200, res.text
        expected = res.json()["probabilities"]
        res = client.post("/explain", files={"file": ("a.png", _png())}, data={"smooth": "1"})
        assert res.status_code == 200 and res.json()["smooth"] is True

        # Oversized: refused on Content-Length, the connection closed, the server fine.
        for size in (2**20 + 100, 8 * 2**20):
            big = b"\x89PNG\r\n\x1a\n" + bytes(size)
            res = client.post("/predict", files={"file": ("big.png", big)})
            assert res.status_code == 413, res.text
            assert res.json()["code"] == "payload_too_large"

        # Streamed without Content-Length: counted as it arrives.
        def chunks() -> Iterator[bytes]:
            yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'
            for _ in range(32):
                yield bytes(2**16)
            yield b"\r\n--b--\r\n"

        res = client.post(
            "/predict",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=b"},
        )
        assert res.status_code == 413, res.text

        res = client.post("/predict", files={"file": ("a.txt", b"hello")})
        assert res.status_code == 415 and res.json()["code"] == "unsupported_media_type"
        # Still serving, with the same answer.
        res = client.post("/predict", files={"file": ("a.png", _png())})
        assert res.status_code == 200 and res.json()["probabilities"] == expected
        assert "braincam_requests_total" in client.get("/metrics").text
