"""Soak: a real uvicorn process on 127.0.0.1 under mixed good and hostile traffic,
32 requests in flight. Zero 5xx, every good answer equal to the in-process result
for the same bytes, every bad one its expected 4xx, server RSS growth < 10 % after a
warm-up. Bounded: a fixed number of requests, each with a timeout."""

from __future__ import annotations

import gzip
import random
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import psutil
import pytest
from hostile_inputs import Case, brain_slice, dicom, encode, hostile_cases, nifti

from braincam.decision import decide
from braincam.decoding import decode_image
from braincam.inference import OnnxModel
from braincam.preprocessing import preprocess
from service.local_server import serve

CPU = "CPUExecutionProvider"
MAX_UPLOAD_BYTES = 2**20
PARALLEL = 32
WARMUP_REQUESTS = 192
SOAK_REQUESTS = 2400
GOOD_SHARE = 0.6
MAX_RSS_GROWTH = 0.10
# Cases that exercise the same code as others at a higher client-side cost.
SKIPPED_BAD = {"png_bomb_48mp", "nifti_gzip_bomb"}


@dataclass(frozen=True)
class Good:
    name: str
    path: str
    data: bytes
    form: dict[str, str]

    def request(self) -> dict[str, Any]:
        files = {"file": ("scan.bin", self.data, "application/octet-stream")}
        return {"method": "POST", "url": self.path, "files": files, "data": self.form}


def _good_requests() -> list[Good]:
    gray = brain_slice(seed=3)
    rgb = cv2.applyColorMap(gray, cv2.COLORMAP_BONE)
    vol = np.stack([brain_slice(seed=k).T.astype(np.int16) * 4 for k in range(5)], axis=2)
    samples = {
        "png": encode(".png", gray),
        "png16": encode(".png", gray.astype(np.uint16) * 257),
        "png_rgb_big": encode(".png", cv2.resize(rgb, (512, 480))),
        "jpeg": encode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, 92]),
        "dicom": dicom(gray.astype(np.uint16) * 16),
        "nifti_gz": gzip.compress(nifti(vol)),
    }
    goods = [Good(f"predict_{k}", "/predict", v, {}) for k, v in samples.items()]
    goods += [
        Good("explain_png", "/explain", samples["png"], {"method": "gradcam++"}),
        Good("explain_dicom", "/explain", samples["dicom"], {"smooth": "true"}),
    ]
    return goods


@pytest.fixture(scope="module")
def server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, int]]:
    log = tmp_path_factory.mktemp("soak") / "server.log"
    settings = {
        "BRAINCAM_MAX_UPLOAD_MB": str(MAX_UPLOAD_BYTES / 2**20),
        "BRAINCAM_MAX_CONCURRENCY": "4",
        "BRAINCAM_INTRA_OP_THREADS": "1",
    }
    with serve(tiny_model_dir, settings, log) as live:
        yield live.url, live.process.pid
    assert "unhandled error" not in log.read_text()


def _expected(model: OnnxModel, good: Good) -> dict[str, float]:
    x = preprocess(decode_image(good.data).pixels, model.spec.preprocessing)[None]
    return decide(model.predict(x)[0], model.spec).probabilities


def _plan(n: int, goods: list[Good], bads: list[Case], rng: random.Random) -> list[Good | Case]:
    return [rng.choice(goods) if rng.random() < GOOD_SHARE else rng.choice(bads) for _ in range(n)]


def _fire(client: httpx.Client, item: Good | Case) -> tuple[Good | Case, int, Any]:
    res = client.request(**item.request())
    is_json = res.headers.get("content-type", "").startswith("application/json")
    return item, res.status_code, res.json() if is_json else res.text


def test_soak(server: tuple[str, int], tiny_model_dir: Path) -> None:
    url, pid = server
    model = OnnxModel(tiny_model_dir, providers=[CPU])
    goods = _good_requests()
    expected = {g.name: _expected(model, g) for g in goods}
    bads = [c for c in hostile_cases(MAX_UPLOAD_BYTES) if c.name not in SKIPPED_BAD]
    rng = random.Random(0)
    proc = psutil.Process(pid)
    limits = httpx.Limits(max_connections=PARALLEL, max_keepalive_connections=PARALLEL)

    def run(plan: list[Good | Case]) -> list[tuple[Good | Case, int, Any]]:
        with (
            httpx.Client(base_url=url, timeout=60, limits=limits) as client,
            ThreadPoolExecutor(PARALLEL) as pool,
        ):
            return list(pool.map(lambda item: _fire(client, item), plan))

    # Warm-up: every kind of request at full concurrency, so allocator arenas,
    # ORT buffers and codec state reach their steady size before RSS is measured.
    warm = [*goods, *bads] * 2
    warm += _plan(WARMUP_REQUESTS - len(warm), goods, bads, rng)
    run(warm)
    rss_before = proc.memory_info().rss

    started = time.perf_counter()
    results = run(_plan(SOAK_REQUESTS, goods, bads, rng))
    seconds = time.perf_counter() - started
    rss_after = proc.memory_info().rss

    statuses = Counter(status for _, status, _ in results)
    server_errors = [(item.name, status, body) for item, status, body in results if status >= 500]
    wrong: list[tuple[str, int, Any]] = []
    n_good = 0
    for item, status, body in results:
        if isinstance(item, Good):
            n_good += 1
            ok = status == 200 and body["probabilities"] == pytest.approx(
                expected[item.name], abs=1e-6
            )
        else:
            ok = status == item.status and (item.code is None or body.get("code") == item.code)
        if not ok:
            wrong.append((item.name, status, str(body)[:200]))
    growth = rss_after / rss_before - 1
    print(
        f"\nsoak: {len(results)} requests ({n_good} good, {len(results) - n_good} bad) after "
        f"{len(warm)} warm-up, {PARALLEL} in parallel, {seconds:.1f} s "
        f"({len(results) / seconds:.0f} req/s); statuses {dict(sorted(statuses.items()))}; "
        f"5xx: {len(server_errors)}; RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB "
        f"({growth:+.1%})"
    )
    assert len(results) >= 500 and n_good > 200
    assert not server_errors, server_errors[:5]
    assert not wrong, wrong[:5]
    assert growth < MAX_RSS_GROWTH
    with httpx.Client(base_url=url, timeout=10) as client:
        assert client.get("/health").json()["status"] == "ok"
