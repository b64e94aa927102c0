"""`python -m exporter --model model.onnx ...`: the ONNX path of the exporter's CLI."""

from __future__ import annotations

import argparse
import sys

from exporter.errors import ExportError


def export_onnx(args: argparse.Namespace) -> int:
    from exporter.budget import parse_limit
    from exporter.onnx_export import export_onnx_model

    height, width = args.input_size or (None, None)
    try:
        result = export_onnx_model(
            args.model,
            args.out,
            labels=args.labels.split(",") if args.labels else [],
            layer=args.layer,
            height=height,
            width=width,
            channels=args.channels,
            scale=args.scale,
            mean=args.mean,
            std=args.std,
            layout=args.layout,
            interpolation=args.interpolation,
            outputs=args.outputs,
            calibration=args.calibration,
            name=args.name,
            version=args.version,
            task=args.task,
            threshold=args.threshold,
            ood_detector=args.ood_detector,
            memory_limit=parse_limit(args.memory_limit),
        )
    except (ExportError, ValueError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    spec = result.spec
    parity = spec.parity
    print(f"exported {spec.name} v{spec.version} to {result.out_dir} in {result.seconds:.1f} s")
    print(f"  labels: {', '.join(spec.labels)}   explained tensor: {spec.explanation.layer} "
          f"{spec.explanation.activation_shape} (score: {spec.explanation.score})")
    print(f"  preprocessing: {spec.preprocessing.model_dump_json()}")
    if result.estimate is not None:
        print(f"  memory: {result.estimate.describe()}, limit "
              f"{result.estimate.limit / 2**30:.2f} GiB")
    for file in spec.graphs.files():
        print(f"  {file.file}: {file.size_bytes / 2**20:.2f} MiB  sha256 {file.sha256[:12]}")
    print(f"  gate on {parity['n_inputs']} inputs: "
          + ", ".join(f"{k}={v:.2g}" for k, v in parity.items() if isinstance(v, float)))
    return 0
