"""What the HTTP service adds on top of raw ONNX Runtime, measured in one run.

    python -m benchmarks.bench_service --model-dir models/demo [--n 100] [--image FILE]
        [--size 512] [--server]

Times N sequential requests to /predict against `OnnxModel.predict` on the same
preprocessed tensor, and N requests to /explain against the raw gradcam.onnx run.
The ratios are the overhead of HTTP + multipart + decode + preprocess (predict),
and of that plus CAM + colouring + three PNG encodings + base64 (explain). The
service's own `timing_ms` medians show where the time goes.

By default requests go through FastAPI's in-process TestClient (no sockets);
`--server` starts `python -m service` (uvicorn) on 127.0.0.1 and uses real HTTP.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from braincam.decoding import decode_image
from braincam.inference import OnnxModel
from braincam.preprocessing import preprocess

ROOT = Path(__file__).resolve().parents[1]


def _stats(times_ms: list[float]) -> tuple[float, float]:
    ordered = sorted(times_ms)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return statistics.median(ordered), p90


def _time(fn: Callable[[], Any], n: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000.0)
    return out


def _image(path: Path | None, size: int | None) -> bytes:
    if path is None:
        found = sorted((ROOT / "data" / "demo" / "Testing").glob("*/*.png"))
        path = found[0] if found else None
    if path is not None:
        data = path.read_bytes()
        if size is None:
            return data
        img = decode_image(data).pixels
    else:  # no demo data: a smooth synthetic slice
        yy, xx = np.mgrid[0:256, 0:256]
        img = (127 + 100 * np.sin(xx / 17.0) * np.cos(yy / 23.0)).astype(np.uint8)
    if size is not None:
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _client(model_dir: Path, server: bool) -> Iterator[Any]:
    env = {
        "BRAINCAM_MODEL_DIR": str(model_dir),
        "BRAINCAM_PROVIDERS": "CPUExecutionProvider",
        "BRAINCAM_LOG_LEVEL": "warning",
    }
    if not server:
        from fastapi.testclient import TestClient

        from service.core.config import Settings
        from service.main import create_app

        settings = Settings(
            model_dir=model_dir, providers="CPUExecutionProvider", log_level="warning"
        )
        with TestClient(create_app(settings)) as client:
            if not client.app.state.runtime.wait(300):  # type: ignore[attr-defined]
                sys.exit(f"model failed to load: {client.get('/health').json()['error']}")
            yield client
        return

    import httpx

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service"],
        cwd=ROOT,
        env={**os.environ, **env, "BRAINCAM_PORT": str(port)},
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None:
                    sys.exit("the server exited during start-up")
                try:
                    if client.get("/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    sys.exit("the server did not become ready")
                time.sleep(0.2)
            yield client
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=Path("models/demo"))
    p.add_argument("--n", type=int, default=100, help="requests per measurement")
    p.add_argument("--image", type=Path, help="default: the first demo test image")
    p.add_argument("--size", type=int, help="resize the image to SIZE x SIZE first")
    p.add_argument("--server", action="store_true", help="real uvicorn instead of TestClient")
    args = p.parse_args(argv)

    data = _image(args.image, args.size)
    model = OnnxModel(args.model_dir, providers=["CPUExecutionProvider"])
    model.warmup()
    decoded = decode_image(data)
    x = preprocess(decoded.pixels, model.spec.preprocessing)[None]
    width, height = decoded.size
    print(
        f"model {model.spec.name} (input {model.spec.input_shape}), image {width}x{height} "
        f"{decoded.format} {len(data) / 1024:.1f} KiB, n={args.n}, "
        f"{'uvicorn on 127.0.0.1' if args.server else 'TestClient (in-process)'}"
    )

    raw_predict = _time(lambda: model.predict(x), args.n)
    raw_gradcam = _time(lambda: model.gradcam(x), args.n)

    server_timing: dict[str, list[dict[str, float]]] = {"/predict": [], "/explain": []}
    with _client(args.model_dir, args.server) as client:

        def call(path: str) -> None:
            res = client.post(path, files={"file": ("image.png", data)})
            if res.status_code != 200:
                sys.exit(f"{path}: HTTP {res.status_code} {res.text}")
            server_timing[path].append(res.json()["timing_ms"])

        http_predict = _time(lambda: call("/predict"), args.n)
        http_explain = _time(lambda: call("/explain"), args.n)

    rows = [
        ("OnnxModel.predict (classifier.onnx)", raw_predict),
        ("POST /predict", http_predict),
        ("OnnxModel.gradcam (gradcam.onnx)", raw_gradcam),
        ("POST /explain", http_explain),
    ]
    print(f"\n{'what':<38}{'median ms':>11}{'p90 ms':>10}")
    for name, times in rows:
        med, p90 = _stats(times)
        print(f"{name:<38}{med:>11.2f}{p90:>10.2f}")

    pm, em = statistics.median(http_predict), statistics.median(http_explain)
    rp, rg = statistics.median(raw_predict), statistics.median(raw_gradcam)
    print(
        f"\n/predict vs raw classifier: {pm / rp:.1f}x "
        f"(+{pm - rp:.2f} ms of HTTP + multipart + decode + preprocess)"
    )
    print(
        f"/explain vs raw gradcam:    {em / rg:.1f}x "
        f"(+{em - rg:.2f} ms of HTTP + decode + preprocess + CAM + PNG encoding)"
    )
    print(f"/explain vs /predict:       {em / pm:.1f}x")

    print("\nservice timing_ms medians (measured inside the handler):")
    for path, timings in server_timing.items():
        keys = list(timings[-1])
        medians = {k: statistics.median(t[k] for t in timings[3:]) for k in keys}
        print(f"  {path:<9} " + "  ".join(f"{k} {v:.2f}" for k, v in medians.items()))


if __name__ == "__main__":
    main()
