"""Float vs INT8 classifier latency, batch 1 and 16, on this CPU.

    python -m benchmarks.quantization --model-dir models/demo [--calibration DIR]
    python -m benchmarks.quantization --backbone xception   # random weights, 299x299x3

The classifier is quantised with the exporter's own `quantize_classifier` (both
`reduce_range` settings, so the choice is a measurement), then each session is timed
interleaved with the others: a change in background load hits every variant alike.
With `--backbone`, a keras.applications network with random weights is converted
first (the `train` extra is needed); its near-uniform random outputs make top-1
agreement meaningless, so it is only reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import machine_info
from braincam.model_spec import load_spec
from braincam.preprocessing import Preprocessing
from exporter.model_dir import calibration_inputs
from exporter.quantize import quantize_classifier

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 16)


def cpu_flags() -> str:
    """The CPU features INT8 speed depends on (VNNI: int8 dot products in one step)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return ", ".join(f for f in wanted if f in flags) or "none of " + ", ".join(wanted)


def export_backbone(name: str, out: Path) -> tuple[Path, int]:
    """A keras.applications classifier with random weights as an ONNX graph (the
    exporter's converter, classifier only: the Grad-CAM graph is not quantised)."""
    import keras
    import onnx
    import tensorflow as tf

    from exporter.convert import to_onnx

    builders = {
        "xception": (keras.applications.Xception, 299),
        "efficientnetb0": (keras.applications.EfficientNetB0, 224),
    }
    build, size = builders[name]
    model = build(weights=None, input_shape=(size, size, 3), classes=4)
    spec = [tf.TensorSpec([None, size, size, 3], tf.float32, name="image")]
    fn = tf.function(lambda image: model(image, training=False), input_signature=spec)
    path = out / f"{name}.onnx"
    onnx.save(to_onnx(fn, 17), str(path))
    return path, size
def _time(session: object, x: np.ndarray, seconds: float) -> list[float]:
    run = session.run  # type: ignore[attr-defined]
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        t0 = time.perf_counter()
        run(None, {"image": x})
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def agreement(variants: dict[str, Path], x: np.ndarray) -> dict[str, str]:
    """Top-1 agreement and max probability difference of each INT8 variant."""
    import onnxruntime as ort

    outputs = {
        key: np.concatenate([
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
                None, {"image": x[i : i + 8]})[0]
            for i in range(0, len(x), 8)
        ])
        for key, path in variants.items()
    }
    ref = outputs.pop("float32")
    return {
        key: f"top-1 agreement {np.mean(out.argmax(1) == ref.argmax(1)):.2%}, max "
        f"probability difference {np.abs(out - ref).max():.4f} on {len(x)} images"
        for key, out in outputs.items()
    }


def measure(variants: dict[str, Path], x1: np.ndarray, rounds: int, seconds: float
            ) -> dict[tuple[str, int], list[float]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as served
    sessions = {
        key: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for key, path in variants.items()
    }
    results: dict[tuple[str, int], list[float]] = {}
    for n in BATCHES:
        x = np.ascontiguousarray(np.repeat(x1, n, axis=0))
        for s in sessions.values():
            s.run(None, {"image": x})  # warm-up at this batch size
        for _ in range(rounds):
            for key, s in sessions.items():
                results.setdefault((key, n), []).extend(_time(s, x, seconds))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--backbone", choices=("xception", "efficientnetb0"))
    p.add_argument("--calibration", type=Path, default=ROOT / "data" / "demo" / "Testing")
    p.add_argument("--limit", type=int, default=128, help="calibration images")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0, help="per variant, batch and round")
    args = p.parse_args(argv)
    if (args.model_dir is None) == (args.backbone is None):
        p.error("pass --model-dir or --backbone")

    with tempfile.TemporaryDirectory(prefix="braincam-qbench-") as tmp:
        work = Path(tmp)
        if args.backbone:
            source, size = export_backbone(args.backbone, work)
            prep = Preprocessing(height=size, width=size, channels=3, scale="symmetric")
            title = f"{args.backbone} {prep.input_shape}, random weights"
        else:
            spec = load_spec(args.model_dir)
            source, prep = args.model_dir / spec.graphs.classifier.file, spec.preprocessing
            title = f"{spec.name} {prep.input_shape}"
        x = calibration_inputs(args.calibration, prep, limit=args.limit)
        variants = {"float32": source}
        for reduce_range in (False, True):
            key = f"int8 reduce_range={reduce_range}"
            variants[key] = work / f"int8_rr{int(reduce_range)}.onnx"
            quantize_classifier(source, variants[key], x, reduce_range=reduce_range)
        # Only the MAC-heavy operators: no Q/DQ pairs around activations, SE blocks, ...
        key = "int8 Conv/MatMul/Gemm only"
        variants[key] = work / "int8_mac.onnx"
        quantize_classifier(source, variants[key], x, op_types=["Conv", "MatMul", "Gemm"])
        notes = agreement(variants, x)
        results = measure(variants, x[:1], args.rounds, args.seconds)

    machine = machine_info()
    lines = [
        f"# INT8 vs float32: {title}",
        "",
        f"- CPU: {machine.get('CPU', '?')}, {os.cpu_count()} logical cores; "
        f"features: {cpu_flags()}",
        "- ORT CPUExecutionProvider, default threads, spinning off (as served); "
        f"{args.rounds} interleaved rounds of {args.seconds:.0f} s per variant and batch",
        *(f"- {k}: {v}" for k, v in notes.items()),
        "",
        "| variant | batch | p50 ms | ms per image | vs float32 |",
        "|---|---|---|---|---|",
    ]
    for n in BATCHES:
        base = statistics.median(results[("float32", n)])
        for key in variants:
            p50 = statistics.median(results[(key, n)])
            lines.append(f"| {key} | {n} | {p50:.2f} | {p50 / n:.2f} | {base / p50:.2f}x |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
