"""Float vs INT8 classifier latency, batch 1 and 16, on this CPU.

    python -m benchmarks.quantization --model-dir models/demo [--calibration DIR]
    python -m benchmarks.quantization --backbone xception   # random weights, 299x299x3

The model directory's classifier is quantised into a temporary copy with the
exporter's own `quantize_model_dir` (both `reduce_range` settings, so the choice is
a measurement), then each session is timed interleaved with the others: a change
in background load hits every variant alike. With `--backbone`, a keras.applications
network with random weights is exported first (the `train` extra is needed); its
near-uniform random outputs make top-1 agreement meaningless, so its gate is off and
the agreement is only reported.
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
from exporter.calibration import calibration_inputs
from exporter.quantize import quantize_model_dir

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


def export_backbone(name: str, out: Path, calibration: Path) -> Path:
    """A keras.applications backbone with random weights, exported by the exporter."""
    import keras

    from exporter.export import export_model

    builders = {
        "xception": (keras.applications.Xception, 299),
        "efficientnetb0": (keras.applications.EfficientNetB0, 224),
    }
    build, size = builders[name]
    model = build(weights=None, input_shape=(size, size, 3), classes=4)
    path = out / f"{name}.keras"
    model.save(path)
    export_model(
        path, out / name, labels=["glioma", "meningioma", "notumor", "pituitary"],
        scale="symmetric", channels=3, calibration=calibration,
    )
    return out / name


def _time(session: object, x: np.ndarray, seconds: float) -> list[float]:
    run = session.run  # type: ignore[attr-defined]
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        t0 = time.perf_counter()
        run(None, {"image": x})
        times.append((time.perf_counter() - t0) * 1e3)
    return times


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
        model_dir = args.model_dir or export_backbone(args.backbone, work, args.calibration)
        gate = 0.0 if args.backbone else 0.99
        variants = {"float32": model_dir / "classifier.onnx"}
        notes = {}
        for reduce_range in (False, True):
            key = f"int8 reduce_range={reduce_range}"
            out = work / key.replace(" ", "_").replace("=", "")
            result = quantize_model_dir(model_dir, args.calibration, out_dir=out,
                                        limit=args.limit, min_agreement=gate,
                                        reduce_range=reduce_range)
            q = result.spec.quantization
            assert q is not None
            variants[key] = out / result.spec.graphs.classifier.file
            notes[key] = (f"top-1 agreement {q.top1_agreement:.2%}, max probability "
                          f"difference {q.max_probability_diff:.4f} on {q.calibration_images}")
        from braincam.model_spec import load_spec

        spec = load_spec(model_dir)
        x1 = calibration_inputs(args.calibration, spec.preprocessing, limit=1)
        results = measure(variants, x1, args.rounds, args.seconds)

    machine = machine_info()
    lines = [
        f"# INT8 vs float32: {spec.name} {spec.input_shape}"
        + (f" ({args.backbone}, random weights)" if args.backbone else ""),
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
