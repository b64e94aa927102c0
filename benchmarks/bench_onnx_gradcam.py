"""Grad-CAM graph vs classifier time at batch 1, for graphs built by the ONNX-level
builder (exporter/onnx_grad), and against the Keras exporter's own Grad-CAM graph.

    python benchmarks/bench_onnx_gradcam.py [--keras-model-dir models/demo] [--repeats 200]

Rows: small PyTorch models in the styles of ResNet, MobileNetV3 and VGG (needs the
`torch` extra) and, with --keras-model-dir, a Keras export's classifier.onnx rebuilt by
the ONNX builder beside that export's gradcam.onnx (same weights, same inputs): the
measurement behind the choice of builder for the Keras path. Medians of single-image
runs in ONNX Runtime on CPU with --threads intra-op threads.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from braincam.model_spec import load_spec
from braincam.preprocessing import Preprocessing
from exporter.onnx_grad import build_graphs


def _session(model: onnx.ModelProto | Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _elapsed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_pair(classifier: Any, gradcam: Any, shape: tuple[int, ...], repeats: int
              ) -> tuple[float, float]:
    """Median ms of each graph, runs interleaved so that load drifts hit both alike."""
    x = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    target = np.full(1, -1, np.int64)

    def run_classifier() -> object:
        return classifier.run(None, {"image": x})

    def run_gradcam() -> object:
        return gradcam.run(None, {"image": x, "target": target})

    for _ in range(10):
        run_classifier()
        run_gradcam()
    pairs = [(_elapsed(run_classifier), _elapsed(run_gradcam)) for _ in range(repeats)]
    return (1e3 * statistics.median(p[0] for p in pairs),
            1e3 * statistics.median(p[1] for p in pairs))


def torch_rows(threads: int, repeats: int) -> list[tuple[str, float, float]]:
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from torch_models import (
            IMAGENET_MEAN,
            IMAGENET_STD,
            ResNet18Shaped,
            TinyMobileNetV3,
            TinyResNet,
            TinyVGG,
        )
        from torch_models import export as torch_export
    except ImportError:
        print("torch is not installed: PyTorch rows skipped", file=sys.stderr)
        return []
    rows = []
    for name, factory, size in [("resnet-style", TinyResNet, 128),
                                ("mobilenetv3-style", TinyMobileNetV3, 128),
                                ("vgg-style", lambda: TinyVGG(size=128), 128),
                                ("resnet18-shaped", ResNet18Shaped, 224)]:
        prep = Preprocessing(height=size, width=size, channels=3, layout="nchw",
                             mean=IMAGENET_MEAN, std=IMAGENET_STD)
        built = build_graphs(torch_export(factory(), size), prep)
        c, g = time_pair(_session(built.classifier, threads), _session(built.gradcam, threads),
                         prep.input_shape, repeats)
        rows.append((f"{name} {size}px (torch -> ONNX builder)", c, g))
    return rows


def keras_rows(model_dir: Path, threads: int, repeats: int) -> list[tuple[str, float, float]]:
    spec = load_spec(model_dir)
    if spec.graphs.gradcam is None:
        return []  # nothing to compare the builder's graph with
    classifier = _session(model_dir / spec.graphs.classifier.file, threads)
    keras_gradcam = _session(model_dir / spec.graphs.gradcam.file, threads)
    source = onnx.load(str(model_dir / spec.graphs.classifier.file))
    # The Keras layer's tensor in tf2onnx's graph: the last node named after the layer.
    layer = [n.output[0] for n in source.graph.node if spec.explanation.layer in n.name]
    built = build_graphs(source, spec.preprocessing, layer=layer[-1] if layer else None)
    onnx_gradcam = _session(built.gradcam, threads)
    x = np.random.default_rng(1).random((8, *spec.input_shape), dtype=np.float32)
    t = np.full(8, -1, np.int64)
    ka, kg = keras_gradcam.run(["activations", "gradients"], {"image": x, "target": t})
    oa, og = onnx_gradcam.run(["activations", "gradients"], {"image": x, "target": t})
    if ka.shape == oa.shape:
        diff = float(np.abs(kg - og).max() / (np.abs(kg).max() + 1e-30))
        weights = float(np.abs(kg.mean((1, 2)) - og.mean((1, 2))).max()
                        / (np.abs(kg.mean((1, 2))).max() + 1e-30))
        print(f"{model_dir.name}: same explained map {ka.shape[1:]} "
              f"(max |acts diff| {np.abs(ka - oa).max():.2g}); Keras exporter vs ONNX builder: "
              f"gradients max relative difference {diff:.2g}, Grad-CAM channel weights "
              f"{weights:.2g} (random inputs, with all-zero channels: ties)")
    else:
        print(f"{model_dir.name}: the builders explain different maps {ka.shape} vs {oa.shape}")
    rows = []
    for label, gradcam in (("Keras exporter", keras_gradcam), ("ONNX builder", onnx_gradcam)):
        c, g = time_pair(classifier, gradcam, spec.input_shape, repeats)
        rows.append((f"{model_dir.name} {spec.input_shape} ({label})", c, g))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keras-model-dir", type=Path, help="a Keras export (e.g. models/demo)")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    rows = torch_rows(args.threads, args.repeats)
    if args.keras_model_dir:
        rows += keras_rows(args.keras_model_dir, args.threads, args.repeats)
    print("\n| model | classifier ms | Grad-CAM graph ms | ratio |\n|---|---|---|---|")
    for name, c, g in rows:
        print(f"| {name} | {c:.3f} | {g:.3f} | {g / c:.2f}x |")


if __name__ == "__main__":
    main()
