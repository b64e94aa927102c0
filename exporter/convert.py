"""tf.function -> ONNX with tf2onnx, plus the checks tf2onnx does not do itself."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import tensorflow as tf
import tf2onnx
from onnx import TensorProto, numpy_helper
from tf2onnx import utils

from exporter.errors import ExportError
from exporter.onnx_io import WEIGHTS_FILE, check, write_with_shared_weights

__all__ = ["WEIGHTS_FILE", "check", "to_onnx", "write_with_shared_weights"]

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
