"""ONNX Runtime (CPU) vs Keras for the same model, measured in one run.

    python -m benchmarks.bench_export --model-dir models/demo [--keras runs/demo/model.keras]

Prints median latency of the classifier and Grad-CAM graphs at batch 1 and 16
next to Keras `predict` / a direct Keras call and a GradientTape Grad-CAM, and the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", type=Path, default=Path("models/demo"))
    p.add_argument("--keras", type=Path, help="default: runs/<name>/model.keras")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()

    import keras
    import tensorflow as tf

    from braincam.inference import OnnxModel
    from exporter.graphs import gradcam_outputs
    from exporter.model_split import split_model

    onnx_model = OnnxModel(args.model_dir, providers=["CPUExecutionProvider"])
    spec = onnx_model.spec
    keras_path = args.keras or Path("runs") / spec.name / "model.keras"
    model = keras.models.load_model(keras_path, compile=False)
    split = split_model(model, spec.explanation.layer)
    rng = np.random.default_rng(0)
    print(
        f"model {spec.name}: input {spec.input_shape}, layer {spec.explanation.layer}, "
        f"classifier.onnx {spec.graphs.classifier.size_bytes / 2**20:.1f} MiB, "
        f"gradcam.onnx {spec.graphs.gradcam.size_bytes / 2**20:.1f} MiB"
        + (f", shared weights.bin {spec.graphs.weights.size_bytes / 2**20:.1f} MiB"
           if spec.graphs.weights else "")
    )
    print(f"{'what':<34}{'batch':>6}{'ORT ms':>10}{'Keras ms':>10}{'Keras/ORT':>11}")
    for batch in (1, 16):
        x = rng.random((batch, *spec.input_shape), dtype=np.float32)
        xt = tf.constant(x)
        t = tf.constant(np.full(batch, -1, dtype=np.int64))
        ort_cls = _median_ms(partial(onnx_model.predict, x), args.repeats)
        k_predict = _median_ms(partial(model.predict, x, verbose=0), args.repeats)
        k_call = _median_ms(partial(model, xt, training=False), args.repeats)
        ort_cam = _median_ms(partial(onnx_model.gradcam, x), args.repeats)
        k_cam = _median_ms(
            partial(gradcam_outputs, split, xt, t, hand_written=False), args.repeats
        )
        for name, o, k in (
            ("classifier vs keras predict()", ort_cls, k_predict),
            ("classifier vs keras model()", ort_cls, k_call),
            ("gradcam vs GradientTape", ort_cam, k_cam),
        ):
            print(f"{name:<34}{batch:>6}{o:>10.2f}{k:>10.2f}{k / o:>10.1f}x")


if __name__ == "__main__":
    main()
