"""The benchmark uploads decode as the sizes and formats they claim, and the report
states the goals per upload (benchmarks/uploads.py, benchmarks/report.py)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from benchmarks.report import goals
from benchmarks.serving import ServingResults, UploadFigures
from benchmarks.stats import Timing
from benchmarks.uploads import benchmark_uploads
from braincam.decoding import decode_image


def test_uploads_decode_at_their_sizes(demo_data: Path) -> None:
    demo = sorted((demo_data / "Testing").glob("*/*.png"))[0].read_bytes()
    uploads = benchmark_uploads(demo, sizes=(96, 128))
    keys = [u.key for u in uploads]
    assert keys == ["demo png 64x64", "png 96", "jpeg 96", "dicom 96", "png 128", "jpeg 128"]
    for upload in uploads[1:]:
        decoded = decode_image(upload.data)
        fmt, size = upload.key.split()
        assert decoded.format == fmt and decoded.size == (int(size), int(size))
    # The noise makes them differ from a plain upscale (scanner-like texture).
    png = decode_image(uploads[1].data).pixels
    plain = cv2.resize(decode_image(demo).pixels, (96, 96), interpolation=cv2.INTER_CUBIC)
    assert 0 < np.abs(png.astype(int) - plain.astype(int)).mean() < 10
    assert decode_image(uploads[3].data).bit_depth == 16  # 12 bits stored in 16


def test_goals_are_stated_per_upload(demo_data: Path) -> None:
    demo = sorted((demo_data / "Testing").glob("*/*.png"))[0].read_bytes()
    (upload,) = benchmark_uploads(demo, sizes=())
    work = {"/predict": {"decode": 1.0, "preprocess": 0.5, "inference": 2.5, "total": 4.5}}
    figures = UploadFigures(
        upload, Timing(10, 3.0, 5.0), Timing(10, 5.0, 6.0), Timing(10, 7.0, 8.0), work, 1000
    )
    serving = ServingResults([], {}, {}, {}, {"x": 100.0}, {"x": 100.0}, [figures])
    found = {g.name: g for g in goals({}, {}, serving, 32) if g.name.startswith(upload.key)}
    predict, explain = found.values()
    assert predict.met and predict.measured.startswith("1.25x")
    assert not explain.met and explain.measured.startswith("1.40x")
