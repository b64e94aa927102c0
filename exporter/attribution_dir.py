"""`python -m exporter attribution --model-dir DIR [--layers L ...] [--calibration DIR]`:
add attribution.onnx to an exported model directory (Keras or ONNX export alike).

The graph is built from the directory's own classifier.onnx (its out-of-distribution
output dropped), gated against finite differences (gate.run_attribution_gate), and
recorded in model.json (`graphs.attribution`, `attribution`). classifier.onnx,
gradcam.onnx and weights.bin stay byte-identical: the new graph reads the weights it
shares with them from weights.bin at their recorded offsets, and keeps only its own
small constants inline. No TensorFlow.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper
from onnx.external_data_helper import set_external_data

from braincam.model_spec import (
    ATTRIBUTION_ONNX,
    PROBABILITIES_OUTPUT,
    Attribution,
    AttributionLayer,
    ModelSpec,
    load_spec,
    save_spec,
)
from exporter.errors import ExportError
from exporter.model_dir import calibration_inputs, graph_file
from exporter.onnx_grad.attribution import (
    DEFAULT_STAGES,
    IMAGE_GRADIENTS_OUTPUT,
    activations_output,
    build_attribution,
    gradients_output,
)
from exporter.onnx_grad.gate import run_attribution_gate
from exporter.onnx_io import check

DEFAULT_CALIBRATION = Path("data/demo/Testing")


def _shared_weights(model_dir: Path, spec: ModelSpec) -> dict[bytes, tuple[int, int]]:
    """sha256 of each tensor stored in weights.bin -> (offset, length), read from the
    existing graphs' external-data records."""
    if spec.graphs.weights is None:
        return {}
    blob = (model_dir / spec.graphs.weights.file).read_bytes()
    found: dict[bytes, tuple[int, int]] = {}
    for graph in (spec.graphs.classifier, spec.graphs.gradcam):
        if graph is None:
            continue
        proto = onnx.load(str(model_dir / graph.file), load_external_data=False)
        for tensor in proto.graph.initializer:
            if tensor.data_location != TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in tensor.external_data}
            offset, length = int(info.get("offset", 0)), int(info["length"])
            key = hashlib.sha256(blob[offset:offset + length]).digest() + bytes([tensor.data_type])
            found[key] = (offset, length)
    return found


def _point_at_weights(proto: onnx.ModelProto, shared: dict[bytes, tuple[int, int]],
                      weights_file: str) -> int:
    """Initializers already in weights.bin become references to it; returns how many."""
    n = 0
    for tensor in proto.graph.initializer:
        raw = numpy_helper.to_array(tensor).tobytes()
        key = hashlib.sha256(raw).digest() + bytes([tensor.data_type])
        if key not in shared:
            continue
        offset, length = shared[key]
        for field in ("float_data", "int32_data", "int64_data", "double_data"):
            tensor.ClearField(field)
        tensor.raw_data = raw
        set_external_data(tensor, weights_file, offset, length)
        tensor.data_location = TensorProto.EXTERNAL
        tensor.ClearField("raw_data")
        n += 1
    return n


def source_of(model_dir: Path, spec: ModelSpec) -> onnx.ModelProto:
    """The directory's classifier with its class probabilities as the only output."""
    proto = onnx.load(str(model_dir / spec.graphs.classifier.file))  # weights resolved
    keep = [o for o in proto.graph.output if o.name == PROBABILITIES_OUTPUT]
    if not keep:
        raise ExportError(f"{spec.graphs.classifier.file} has no {PROBABILITIES_OUTPUT!r} output")
    del proto.graph.output[:]
    proto.graph.output.extend(keep)
    for node in proto.graph.node:  # an ONNX-path export's own bc_image, bc_probabilities
        if node.name.startswith("bc_"):
            node.name = f"{node.name}__source"
    return proto


def add_attribution(model_dir: str | Path, layers: list[str] | None = None,
                    calibration: str | Path | None = None, stages: int = DEFAULT_STAGES,
                    image_rows: int = 8, gate: bool = True) -> ModelSpec:
    """`gate=False` (benchmarks of a random-weight model only) skips the finite
    differences, which in float64 onnx.reference cost minutes at 224x224; model.json
    then records the gate as skipped."""
    model_dir = Path(model_dir)
    spec = load_spec(model_dir)
    if spec.quantization is not None:
        raise ExportError("the classifier is quantised: add attribution.onnx before quantising")
    built = build_attribution(source_of(model_dir, spec), spec.preprocessing, layers,
                              stages=stages)
    x = calibration_inputs(Path(calibration) if calibration else DEFAULT_CALIBRATION,
                           spec.preprocessing)
    weights = spec.graphs.weights.file if spec.graphs.weights else None
    shared = _shared_weights(model_dir, spec)
    if weights:
        _point_at_weights(built.graph, shared, weights)
    fd, tmp = tempfile.mkstemp(prefix=".attribution.", suffix=".onnx", dir=model_dir)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        tmp_path.write_bytes(built.graph.SerializeToString())
        check(built.graph, tmp_path)
        report = (run_attribution_gate(built.source, built.found, built.layers, tmp_path, x,
                                       image_rows=image_rows) if gate else None)
        if report is not None and not report.passed:
            raise ExportError("attribution gate failed, nothing written:\n  "
                              + "\n  ".join(report.failures)
                              + "\nfigures: " + json.dumps(report.figures, indent=1))
        target = model_dir / ATTRIBUTION_ONNX
        tmp_path.chmod(0o644)
        tmp_path.replace(target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    record = graph_file(target, built.graph)
    score = "log_probability" if built.found.kind == "probabilities" else "logit"
    if built.found.kind == "softmax" and spec.calibration is not None:
        score = "logit / temperature"
    spec = spec.model_copy(update={
        "graphs": spec.graphs.model_copy(update={"attribution": record}),
        "attribution": Attribution(
            layers=[AttributionLayer(name=la.name, tensor=la.tensor, activation_shape=la.shape,
                                     activations=activations_output(i),
                                     gradients=gradients_output(i))
                    for i, la in enumerate(built.layers)],
            image_gradients=IMAGE_GRADIENTS_OUTPUT,
            score=score,
            gate=report.as_json() if report is not None else {"skipped": True},
        ),
    })
    save_spec(spec, model_dir)
    return spec


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m exporter attribution",
                                description="Add attribution.onnx (several layers and the "
                                "image gradient in one run) to an exported model directory.")
    p.add_argument("--model-dir", required=True, type=Path)
    p.add_argument("--layers", nargs="+", help="layer names, tensor names or node names "
                   f"(default: the last map of each of the last {DEFAULT_STAGES} stages)")
    p.add_argument("--calibration", type=Path,
                   help=f"images for the gradient gate (default: {DEFAULT_CALIBRATION})")
    args = p.parse_args(argv)
    try:
        spec = add_attribution(args.model_dir, args.layers, args.calibration)
    except (ExportError, FileNotFoundError, ValueError) as exc:
        print(f"attribution failed: {exc}", file=sys.stderr)
        return 1
    assert spec.attribution is not None and spec.graphs.attribution is not None
    gate = spec.attribution.gate
    print(f"added {ATTRIBUTION_ONNX} to {args.model_dir} "
          f"({spec.graphs.attribution.size_bytes / 1024:.0f} KiB)")
    for layer in spec.attribution.layers:
        print(f"  layer {layer.name}: {layer.activation_shape}  ({layer.tensor})")
    errors = {k: v for k, v in gate.items() if k.endswith("fd_max_rel_err")}
    print("  gate: " + ", ".join(f"{k}={v:.2g}" for k, v in errors.items()))
    return 0
