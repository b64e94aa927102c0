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


def _erfc(ctx: Any, node: Any, name: str, args: Any) -> Any:
    """Erfc(x) = 1 - Erf(x): Keras 3's exact GELU (x/2 erfc(-x/√2)), which tf2onnx has
    no converter for."""
    one = ctx.make_const(utils.make_name(f"{node.name}_one"), np.ones((), dtype=np.float32))
    erf = ctx.make_node("Erf", [node.input[0]])
    node.type = "Sub"
    ctx.replace_inputs(node, [one.output[0], erf.output[0]])
    return node


CUSTOM_OP_HANDLERS: dict[str, tuple[Any, list[Any]]] = {
    "ReluGrad": (_relu_grad, []),
    "Erfc": (_erfc, []),
}
# Attributes that keep TensorFlow from inlining a function call (jit_compile=True).
_XLA_ATTRS = ("_XlaMustCompile", "_noinline")


def to_onnx(fn: Callable[..., Any], opset: int) -> onnx.ModelProto:
    if not 13 <= opset <= MAX_OPSET:
        raise ExportError(f"opset must be between 13 and {MAX_OPSET}, got {opset}")
    signature = fn.input_signature  # type: ignore[attr-defined]
    concrete = fn.get_concrete_function()  # type: ignore[attr-defined]
    graph_def = _frozen_with_xla_calls_inlined(concrete)
    if graph_def is None:
        model, _ = tf2onnx.convert.from_function(
            fn, input_signature=signature, opset=opset, custom_op_handlers=CUSTOM_OP_HANDLERS
        )
    else:
        inputs = [t.name for t in concrete.inputs if t.dtype != tf.dtypes.resource]
        outputs = [t.name for t in concrete.outputs if t.dtype != tf.dtypes.resource]
        model, _ = tf2onnx.convert.from_graph_def(
            graph_def, name=concrete.name, input_names=inputs, output_names=outputs,
            opset=opset, custom_op_handlers=CUSTOM_OP_HANDLERS,
            tensors_to_rename=tf2onnx.convert.tensor_names_from_structed(concrete, inputs,
                                                                         outputs),
        )
    _inline_captured_constants(model, concrete, len(signature))
    model.producer_name = "braincam-exporter"
    return model


def _frozen_with_xla_calls_inlined(concrete: Any) -> Any:
    """The frozen graph with its XLA-compiled calls made inlinable, or None if it has
    none. Keras 3 runs grouped convolutions (ConvNeXt's depthwise 7x7) on CPU inside a
    `jit_compile=True` function; tf2onnx keeps such a call as an unconvertible
    StatefulPartitionedCall, while the plain Conv2D inside converts (with `group`)."""
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    def xla_nodes(graph_def: Any) -> list[Any]:
        nodes = list(graph_def.node)
        for function in graph_def.library.function:
            nodes.extend(function.node_def)
        return [n for n in nodes if "_XlaMustCompile" in n.attr and n.attr["_XlaMustCompile"].b]

    if not xla_nodes(concrete.graph.as_graph_def()):
        return None
    frozen = convert_variables_to_constants_v2(concrete, lower_control_flow=False,
                                               aggressive_inlining=True)
    graph_def = frozen.graph.as_graph_def(add_shapes=True)
    holders = [*graph_def.node, *graph_def.library.function]
    for function in graph_def.library.function:
        holders.extend(function.node_def)
    for holder in holders:
        for key in _XLA_ATTRS:
            if key in holder.attr:
                del holder.attr[key]
    return graph_def


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
