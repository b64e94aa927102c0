"""`python -m exporter --model PATH.keras --out models/NAME [...]`,
`python -m exporter triton --model-dir models/NAME --repo DIR [...]` (exporter/triton.py) and
`python -m exporter quantize --model-dir models/NAME --calibration DIR` (exporter/quantize.py) and
`python -m exporter attribution --model-dir models/NAME [--layers ...]`
(exporter/attribution_dir.py)."""

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
        "--calibration",
        type=Path,
        help="real images for the parity gate (default: data/demo/Testing); for a model "
        "without a trainer run also the images the out-of-distribution detector and the "
        "temperature are fitted on (class folders named like the labels give labels)",
    )
    p.add_argument(
        "--ood-detector",
        choices=("mahalanobis", "energy", "none"),
        default="mahalanobis",
        help="out-of-distribution score written into the graphs (default: mahalanobis)",
    )
    p.add_argument(
        "--ood-features",
        choices=("grid", "pooled"),
        default="grid",
        help="what the Mahalanobis detector reads: the explained layer's activations "
        "averaged on a 2x2 grid (default), or the globally pooled penultimate vector",
    )
    p.add_argument(
        "--no-calibrate",
        action="store_true",
        help="skip temperature scaling (probabilities as the model gives them)",
    )
    p.add_argument(
        "--memory-limit",
        type=float,
        default=4.0,
        metavar="GIB",
        help="peak memory the export may use, in GiB (default 4): a model estimated to "
        "need more is refused before any heavy work; sessions run in batches that fit",
    )
    p.add_argument("--task", choices=("multiclass", "binary"))
    p.add_argument(
        "--threshold", type=float, help="binary decision threshold on the positive class"
    )
    p.add_argument("--name")
    p.add_argument("--version")
    p.add_argument(
        "--quantize",
        choices=("int8",),
        help="then quantise the classifier (exporter/quantize.py), calibrated and gated "
        "on the --calibration images",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["triton"]:
        # From an exported model directory: ONNX Runtime only, TensorFlow never loads.
        from exporter import triton

        return triton.main(argv[1:])
    if argv[:1] == ["attribution"]:
        from exporter import attribution_dir

        return attribution_dir.main(argv[1:])
    if argv[:1] == ["quantize"]:
        from exporter import quantize

        return quantize.main(argv[1:])
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.model.suffix.lower() == ".onnx":
        from exporter.onnx_cli import export_onnx  # no TensorFlow on this path

        code = export_onnx(args)
        return _quantize(args, args.out) if code == 0 and args.quantize else code
    onnx_flags = [f for f in ("mean", "std", "layout", "interpolation") if getattr(args, f)]
    if onnx_flags:
        print(f"export failed: --{', --'.join(onnx_flags)} apply to .onnx models only",
              file=sys.stderr)
        return 1
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from exporter.budget import parse_limit
    from exporter.export import export_model  # TensorFlow loads here, after argparse
    from exporter.keras_layers import ExportError, LayerError

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
            ood_detector=args.ood_detector,
            ood_features=args.ood_features,
            calibrate=not args.no_calibrate,
            memory_limit=parse_limit(args.memory_limit),
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
    if spec.ood is not None:
        o = spec.ood
        print(
            f"  out-of-distribution: {o.detector}, threshold {o.threshold:.4g} "
            f"({o.held_out_pass_rate:.1%} of {o.held_out_size} held-out images pass; "
            f"fitted on {o.fit_size})"
        )
    if spec.calibration is not None:
        c = spec.calibration
        f = c.figures
        print(
            f"  temperature {c.temperature:.3g} on {c.fit_size} images: ECE "
            f"{f.get('ece_before', float('nan')):.3f} -> {f.get('ece_after', float('nan')):.3f}"
        )
    print(
        f"  parity on {parity['n_inputs']} inputs: "
        + ", ".join(f"{k}={v:.2g}" for k, v in parity.items() if isinstance(v, float))
    )
    return _quantize(args, result.out_dir) if args.quantize else 0


def _quantize(args: argparse.Namespace, out_dir: Path) -> int:
    """`--quantize int8`: the exported directory's classifier, on the same images."""
    from exporter.errors import ExportError
    from exporter.quantize import QuantizationError, quantize_model_dir, report

    calibration = args.calibration or Path("data/demo/Testing")  # the exporters' default
    try:
        quantised = quantize_model_dir(out_dir, calibration)
    except (QuantizationError, ExportError) as exc:
        print(f"quantisation failed (the float export stands): {exc}", file=sys.stderr)
        return 1
    print(report(quantised))
    return 0
