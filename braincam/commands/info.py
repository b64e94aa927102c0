"""`braincam info --model-dir DIR`: what a model directory holds, and where it runs."""

from __future__ import annotations

import argparse
import json
from typing import Any

from braincam import DISCLAIMER
from braincam.commands.common import add_model_arguments, load_model, model_notice


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def describe(args: argparse.Namespace) -> dict[str, Any]:
    """The facts `info` prints; the model is loaded, so providers are the ones in use."""
    model = load_model(args)
    spec = model.spec
    prep = spec.preprocessing
    return {
        "model_dir": str(args.model_dir),
        "name": spec.name,
        "version": spec.version,
        "task": spec.task,
        "labels": spec.labels,
        "input": {
            "shape": list(spec.input_shape),
            "scale": prep.scale,
            "interpolation": prep.interpolation,
        },
        "decision": spec.decision.model_dump(exclude_none=True),
        "explained_layer": spec.explanation.layer,
        "activation_shape": spec.explanation.activation_shape,
        "parity": spec.parity,
        "graphs": {f.file: f.size_bytes for f in spec.graphs.files()},
        "opset": spec.opset,
        "exported_at": spec.exported_at,
        "versions": spec.versions,
        "provenance": spec.provenance,
        "providers": {
            "active": model.providers.active,
            "available": model.providers.available,
            "warnings": model.providers.warnings,
        },
        "notice": model_notice(model),
        "disclaimer": DISCLAIMER,
    }


def _training(provenance: dict[str, Any]) -> str:
    """One line from model.json's provenance: how the model was made and how it scored."""
    dataset = provenance.get("dataset") or {}
    parts = [
        f"{provenance.get('arch', '?')}, {provenance.get('epochs_run', '?')} epochs, "
        f"seed {provenance.get('seed', '?')}",
        "synthetic demo data" if dataset.get("synthetic") else "",
    ]
    metrics = provenance.get("test_metrics") or {}
    if "accuracy" in metrics:
        parts.append(
            f"test accuracy {metrics['accuracy']:.3f} on {metrics.get('test_size', '?')} images"
        )
    return "; ".join(p for p in parts if p)


def _figure(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def run(args: argparse.Namespace) -> int:
    info = describe(args)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    inp = info["input"]
    lines = [
        f"model          {info['name']} v{info['version']} ({info['task']}) in {info['model_dir']}",
        f"labels         {', '.join(info['labels'])}",
        f"input          {'x'.join(str(d) for d in inp['shape'])} (H x W x C), "
        f"scale {inp['scale']}, {inp['interpolation']} resize",
        f"explained      layer {info['explained_layer']}, activations "
        f"{'x'.join(str(d) for d in info['activation_shape'])}",
    ]
    if info["decision"]:
        lines.append(f"decision       {info['decision']}")
    lines.append(
        "graphs         "
        + ", ".join(f"{name} ({size / 2**20:.2f} MiB)" for name, size in info["graphs"].items())
        + f", opset {info['opset']}"
    )
    if info["exported_at"]:
        lines.append(f"exported       {info['exported_at']}")
    if info["provenance"]:
        lines.append(f"trained        {_training(info['provenance'])}")
    providers = info["providers"]
    lines.append(
        f"providers      active {', '.join(providers['active'])} "
        f"(available: {', '.join(providers['available'])})"
    )
    lines += [f"               warning: {w}" for w in providers["warnings"]]
    parity = info["parity"]
    if parity:
        lines.append("parity (ONNX Runtime vs Keras, from the export):")
        lines += [
            f"  {key:<44} {_figure(value)}"
            for key, value in parity.items()
            if not isinstance(value, dict)
        ]
        for key, value in parity.items():
            if isinstance(value, dict):
                lines.append(
                    f"  {key:<44} " + ", ".join(f"{k} {_figure(v)}" for k, v in value.items())
                )
    if info["notice"]:
        lines.append(f"notice: {info['notice']}")
    lines.append(f"Research use only. {info['disclaimer']}")
    print("\n".join(lines))
    return 0
