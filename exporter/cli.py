"""`python -m exporter --model PATH.keras --out models/NAME [...]`, and
`python -m exporter triton --model-dir models/NAME --repo DIR [...]` (exporter/triton.py)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m exporter",
        description="Export a Keras or ONNX CNN classifier to classifier.onnx + gradcam.onnx + "
        "model.json, gated on numerical parity.",
    )
    p.add_argument(
        "--model", required=True, type=Path, help="a .keras (or .h5) or .onnx model file"
    )
    p.add_argument("--out", required=True, type=Path, help="model directory to write")
    p.add_argument("--labels", help="comma-separated class names (default: from run.json)")
    p.add_argument(
        "--layer",
        help="layer to explain (default: run.json, else the last 4-D layer, also inside a "
        "nested backbone); a nested model's name means its output",
    )
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"))
    p.add_argument("--channels", type=int, choices=(1, 3))
    p.add_argument(
        "--scale",
        choices=("unit", "symmetric", "none"),
        help="unit = x/255, symmetric = x/127.5-1, none = raw 0..255",
    )
    p.add_argument(
        "--outputs",
        choices=("auto", "probabilities", "logits"),
        default="auto",
        help="what the model's last layer returns (auto: from its activation)",
    )
    onnx_only = p.add_argument_group("ONNX models only")
    onnx_only.add_argument("--mean", nargs="+", type=float, help="per-channel mean, after --scale")
    onnx_only.add_argument("--std", nargs="+", type=float, help="per-channel std, after --scale")
    onnx_only.add_argument("--layout", choices=("nchw", "nhwc"), help="default: from the input")
    onnx_only.add_argument("--interpolation", choices=("area", "linear", "cubic", "nearest"))
    p.add_argument("--opset", type=int, default=17)
    p.add_argument(
        "--calibration", type=Path, help="images for the parity gate (default: data/demo/Testing)"
    )
    p.add_argument("--task", choices=("multiclass", "binary"))
    p.add_argument(
        "--threshold", type=float, help="binary decision threshold on the positive class"
    )
    p.add_argument("--name")
    p.add_argument("--version")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["triton"]:
        # From an exported model directory: ONNX Runtime only, TensorFlow never loads.
        from exporter import triton

        return triton.main(argv[1:])
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.model.suffix.lower() == ".onnx":
        from exporter.onnx_cli import export_onnx  # no TensorFlow on this path

        return export_onnx(args)
    onnx_flags = [f for f in ("mean", "std", "layout", "interpolation") if getattr(args, f)]
    if onnx_flags:
        print(f"export failed: --{', --'.join(onnx_flags)} apply to .onnx models only",
              file=sys.stderr)
        return 1
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from exporter.export import export_model  # TensorFlow loads here, after argparse
    from exporter.model_split import ExportError, LayerError

    height, width = args.input_size or (None, None)
    try:
        result = export_model(
            args.model,
            args.out,
            labels=args.labels.split(",") if args.labels else None,
            layer=args.layer,
            height=height,
            width=width,
            channels=args.channels,
            scale=args.scale,
            outputs="auto" if args.outputs == "probabilities" else args.outputs,
            opset=args.opset,
            calibration=args.calibration,
            name=args.name,
            version=args.version,
            task=args.task,
            threshold=args.threshold,
        )
    except (ExportError, ValueError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, LayerError) else 1  # 2: a usage error, as argparse's
    spec = result.spec
    parity = spec.parity
    print(f"exported {spec.name} v{spec.version} to {result.out_dir} in {result.seconds:.1f} s")
    print(
        f"  labels: {', '.join(spec.labels)}   explained layer: {spec.explanation.layer} "
        f"{spec.explanation.activation_shape}"
    )
    for file in spec.graphs.files():
        print(f"  {file.file}: {file.size_bytes / 2**20:.2f} MiB  sha256 {file.sha256[:12]}")
    print(
        f"  parity on {parity['n_inputs']} inputs: "
        + ", ".join(f"{k}={v:.2g}" for k, v in parity.items() if isinstance(v, float))
    )
    return 0
