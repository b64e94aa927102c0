"""tf.function -> ONNX with tf2onnx, plus the checks tf2onnx does not do itself."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import tensorflow as tf
import tf2onnx
from onnx import TensorProto, numpy_helper
from onnx.external_data_helper import set_external_data
from tf2onnx import utils

from exporter.model_split import ExportError

MAX_OPSET = 18


def _relu_grad(ctx: Any, node: Any, name: str, args: Any) -> Any:
    """ReluGrad(dy, x) = dy · (x > 0). tf2onnx has no converter of its own for it and
    would otherwise write an invalid graph without an error."""
    dy, x = node.input[0], node.input[1]
    zero = ctx.make_const(utils.make_name(f"{node.name}_zero"), np.zeros((), dtype=np.float32))
    positive = ctx.make_node("Greater", [x, zero.output[0]])
    mask = ctx.make_node("Cast", [positive.output[0]], attr={"to": TensorProto.FLOAT})
    node.type = "Mul"
    ctx.replace_inputs(node, [dy, mask.output[0]])
    return node


CUSTOM_OP_HANDLERS: dict[str, tuple[Any, list[Any]]] = {"ReluGrad": (_relu_grad, [])}


def to_onnx(fn: Callable[..., Any], opset: int) -> onnx.ModelProto:
    if not 13 <= opset <= MAX_OPSET:
        raise ExportError(f"opset must be between 13 and {MAX_OPSET}, got {opset}")
    signature = fn.input_signature  # type: ignore[attr-defined]
    model, _ = tf2onnx.convert.from_function(
        fn, input_signature=signature, opset=opset, custom_op_handlers=CUSTOM_OP_HANDLERS
    )
    _inline_captured_constants(model, fn.get_concrete_function(), len(signature))  # type: ignore[attr-defined]
    model.producer_name = "braincam-exporter"
    return model


def _inline_captured_constants(model: onnx.ModelProto, concrete: Any, n_inputs: int) -> None:
    """Eager constants a layer created outside the traced function (e.g. the
    Normalization layer of EfficientNet) are captured as extra function inputs and
    would become required graph inputs; turn them back into initializers."""
    captured = {
        placeholder.name: value
        for placeholder, value in zip(
            concrete.inputs[n_inputs:], concrete.captured_inputs, strict=False
        )
        if placeholder.dtype != tf.dtypes.resource
    }
    for graph_input in list(model.graph.input):
        if graph_input.name in captured:
            value = np.asarray(captured[graph_input.name].numpy())
            model.graph.initializer.append(numpy_helper.from_array(value, graph_input.name))
            model.graph.input.remove(graph_input)


def check(model: onnx.ModelProto, path: Path) -> None:
    """Structural validity: tf2onnx can emit unconverted ops silently.

    Checked from the file so that external weights are resolved too."""
    what = path.name
    foreign = sorted({n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise ExportError(
            f"{what}: unconverted TensorFlow ops left in the graph: {', '.join(foreign)}"
        )
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{what}: onnx.checker rejected the graph: {exc}") from exc


WEIGHTS_FILE = "weights.bin"
_MIN_EXTERNAL_BYTES = 1024  # small constants stay inline; they are not worth an indirection
_ALIGN = 64


def write_with_shared_weights(protos: dict[str, onnx.ModelProto], out_dir: Path) -> Path | None:
    """Write the graphs so that identical initializers are stored once, in weights.bin.

    Both graphs carry the same network weights (the Grad-CAM graph is a superset),
    so a model directory would otherwise hold every weight twice. Each initializer
    becomes an external-data reference (offset, length) into one shared file that
    ONNX Runtime resolves relative to the graph's own path.
    """
    offsets: dict[bytes, tuple[int, int]] = {}
    weights = out_dir / WEIGHTS_FILE
    with weights.open("wb") as fh:
        for proto in protos.values():
            for tensor in proto.graph.initializer:
                array = numpy_helper.to_array(tensor)
                raw = array.tobytes()
                if len(raw) < _MIN_EXTERNAL_BYTES:
                    continue
                key = hashlib.sha256(raw).digest() + bytes([tensor.data_type])
                if key not in offsets:
                    fh.write(b"\0" * (-fh.tell() % _ALIGN))
                    offsets[key] = (fh.tell(), len(raw))
                    fh.write(raw)
                offset, length = offsets[key]
                for field in ("float_data", "int32_data", "int64_data", "double_data"):
                    tensor.ClearField(field)
                tensor.raw_data = raw  # set_external_data insists on raw_data being present
                set_external_data(tensor, WEIGHTS_FILE, offset, length)
                tensor.data_location = TensorProto.EXTERNAL
                tensor.ClearField("raw_data")
    for filename, proto in protos.items():
        (out_dir / filename).write_bytes(proto.SerializeToString())
    if not offsets:
        weights.unlink()
        return None
    return weights
