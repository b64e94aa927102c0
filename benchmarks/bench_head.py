"""What the head check (braincam/head.py) costs /explain, and what it says on the demo.

    python -m benchmarks.bench_head [--model-dir models/demo] [--repeats 200] [--images 75]

1. Cost: `service.pipeline.explain` (the blocking work of one /explain: decode,
   preprocess, the Grad-CAM run, the map, the overlay PNG) on the demo slice at the
   model's input size and on larger uploads, with and without the head check, called
   in alternation so background load weighs on both sides alike; the ratio of the
   medians. "Without" swaps the check for one returning no share (the only way to
   leave it out: /explain always runs it).
2. The demo model's `heat_outside_head` (Grad-CAM of the decided class) over the demo
   test images (rendered in-process as `trainer.demo_data` writes them: seed 0, split
   Testing), per true class, and how many earn the warning.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from benchmarks.machine import load_average
from braincam.head import OUTSIDE_THRESHOLD, HeadCheck
from braincam.inference import OnnxModel
from braincam.overlay import encode_png
from service import pipeline
from service.metrics import Metrics
from trainer.demo_data import CLASSES, render_sample


def _explain_call(model: OnnxModel, data: bytes) -> Callable[[], Any]:
    params = pipeline.ExplainParams(None, "gradcam", "jet", 0.4, False, None)
    metrics = Metrics()
    return lambda: pipeline.explain(model, metrics, data, None, params, time.perf_counter())


def _no_head(image: Any, cam: Any, meaningful: bool = True) -> HeadCheck:
    return HeadCheck(None, None, meaningful)


def cost(model: OnnxModel, data: bytes, repeats: int) -> tuple[float, float]:
    """Median ms of /explain's work with and without the head check, alternating."""
    call = _explain_call(model, data)
    real = pipeline.check_head
    with_head: list[float] = []
    without: list[float] = []
    for _ in range(5):
        call()
    for _ in range(repeats):
        for sink, check in ((with_head, real), (without, _no_head)):
            pipeline.check_head = check
            t0 = time.perf_counter()
            call()
            sink.append((time.perf_counter() - t0) * 1000.0)
    pipeline.check_head = real
    return statistics.median(with_head), statistics.median(without)


def distribution(model: OnnxModel, per_class: int) -> dict[str, list[tuple[float | None, bool]]]:
    """(heat_outside_head, warned) of the decided class's Grad-CAM, per true class."""
    size = model.spec.preprocessing.height
    params = pipeline.ExplainParams(None, "gradcam", "jet", 0.4, False, None, images=frozenset())
    out: dict[str, list[tuple[float | None, bool]]] = {}
    for c, cls in enumerate(CLASSES):
        out[cls] = []
        for i in range(per_class):
            image, _, _ = render_sample((0, 1, c, i), cls, size)
            body = pipeline.explain(model, Metrics(), encode_png(image), None, params, 0.0)
            warned = any(w.code == "heat_outside_head" for w in body.warnings)
            out[cls].append((body.heat_outside_head, warned))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=Path("models/demo"))
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--images", type=int, default=75, help="demo test images per class")
    args = p.parse_args(argv)
    model = OnnxModel(args.model_dir, providers=["CPUExecutionProvider"])
    size = model.spec.preprocessing.height
    slice_, _, _ = render_sample((0, 1, 0, 0), "glioma", size)
    uploads = {f"demo PNG {size}x{size}": encode_png(slice_)}
    for side in (512, 1024):
        big = cv2.resize(slice_, (side, side), interpolation=cv2.INTER_CUBIC)
        uploads[f"PNG {side}x{side}"] = encode_png(big)
    print(f"load average before: {load_average()}")
    print("| upload | /explain work with head (ms) | without (ms) | ratio |")
    print("|---|---|---|---|")
    for name, data in uploads.items():
        with_head, without = cost(model, data, args.repeats)
        print(f"| {name} | {with_head:.2f} | {without:.2f} | {with_head / without:.3f}x |")
    print(f"load average after: {load_average()}")

    shares = distribution(model, args.images)
    print(f"\nheat_outside_head of the decided class's Grad-CAM, {args.images} demo test "
          f"images per class (warning above {OUTSIDE_THRESHOLD}, never for notumor):")
    print("| true class | mean | median | max | above threshold | warned |")
    print("|---|---|---|---|---|---|")
    for cls, rows in shares.items():
        v = np.array([x for x, _ in rows if x is not None], dtype=float)
        above = int((v > OUTSIDE_THRESHOLD).sum())
        flat = len(rows) - len(v)
        warned = sum(w for _, w in rows)
        print(f"| {cls} | {v.mean():.3f} | {np.median(v):.3f} | {v.max():.3f} | {above}"
              + (f" ({flat} flat)" if flat else "") + f" | {warned} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
