"""What the attribution-graph methods cost against /predict, through the service.

    python benchmarks/bench_attribution.py [--size 224] [--repeats 7] [--threads 2]

A ResNet-18-shaped PyTorch model (random weights, needs the `torch` extra) exported
through the ONNX path at --size, attribution.onnx added (its gate skipped: random
weights, and float64 finite differences of a full ResNet cost minutes), then the
shipped demo model too. For each: medians of POST /predict and of POST /explain per
method (images=none, heatmap=raw: the method's own cost, no image encoding), requests
interleaved so that load drifts hit all alike; ratios to /predict from the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.modules.setdefault("triton", None)  # type: ignore[arg-type]  # see tests/conftest.py

REQUESTS: list[tuple[str, dict[str, str]]] = [
    ("gradcam", {"method": "gradcam"}),
    ("hirescam@earliest attribution layer", {"method": "hirescam", "layer": "@1"}),
    ("layercam (fused)", {"method": "layercam"}),
    ("smoothgrad (8)", {"method": "smoothgrad"}),
    ("integrated_gradients (8)", {"method": "integrated_gradients"}),
    ("smoothgrad (4)", {"method": "smoothgrad", "samples": "4"}),
]


def resnet_dir(size: int, tmp: Path) -> Path:
    import torch
    from torch_models import IMAGENET_MEAN, IMAGENET_STD, ResNet18Shaped
    from torch_models import export as torch_export

    from exporter.attribution_dir import add_attribution
    from exporter.onnx_export import export_onnx_model

    torch.manual_seed(0)
    torch_export(ResNet18Shaped().eval(), size, tmp / "resnet18.onnx")
    out = tmp / "resnet18"
    export_onnx_model(tmp / "resnet18.onnx", out, labels=["a", "b", "c", "d"],
                      mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD),
                      calibration=ROOT / "data" / "demo" / "Testing", ood_detector="none")
    add_attribution(out, calibration=ROOT / "data" / "demo" / "Testing", gate=False)
    return out


def measure(model_dir: Path, size: int, repeats: int) -> list[tuple[str, float, float]]:
    from clients import ready_client

    from braincam.decoding import load_image
    from braincam.inference import CPU
    from braincam.overlay import encode_png
    from service.core.config import Settings

    image = load_image(ROOT / "examples" / "images" / "glioma.png")
    data = encode_png(cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA))
    with ready_client(Settings(model_dir=model_dir, providers=[CPU])) as client:  # type: ignore[arg-type]
        layers = client.get("/metadata").json()["cam_layers"]

        def call(form: dict[str, str] | None) -> float:
            t0 = time.perf_counter()
            if form is None:
                r = client.post("/predict", files={"file": ("x.png", data)})
            else:
                fields = {k: (layers[int(v[1:]) % len(layers)] if v.startswith("@") else v)
                          for k, v in form.items()}
                r = client.post("/explain", files={"file": ("x.png", data)},
                                data={**fields, "images": "none", "heatmap": "raw"})
            assert r.status_code == 200, r.text
            return time.perf_counter() - t0

        forms: list[dict[str, str] | None] = [None, *(f for _, f in REQUESTS)]
        for form in forms:  # warm-up
            call(form)
        times: list[list[float]] = [[] for _ in forms]
        for _ in range(repeats):
            for i, form in enumerate(forms):
                times[i].append(call(form))
    medians = [1e3 * statistics.median(t) for t in times]
    return [("/predict", medians[0], 1.0)] + [
        (name, m, m / medians[0]) for (name, _), m in zip(REQUESTS, medians[1:], strict=True)
    ]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("BRAINCAM_INTRA_OP_THREADS", str(args.threads))
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        rows: dict[str, Any] = {
            f"ResNet-18-shaped at {args.size}x{args.size}": measure(
                resnet_dir(args.size, Path(tmp)), args.size, args.repeats),
            "demo model (150x150)": measure(ROOT / "models" / "demo", 150, args.repeats),
        }
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    for title, table in rows.items():
        print(f"\n{title}\n| request | median ms | x /predict |\n|---|---|---|")
        for name, ms, ratio in table:
            print(f"| {name} | {ms:.0f} | {ratio:.1f} |")


if __name__ == "__main__":
    main()
