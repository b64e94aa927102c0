"""tf.function -> ONNX with tf2onnx, plus the checks tf2onnx does not do itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import tensorflow as tf
import tf2onnx
from onnx import TensorProto, numpy_helper
from tf2onnx import utils

from braincam.model_spec import IMAGE_INPUT, PROBABILITIES_OUTPUT
from braincam.preprocessing import Layout
from exporter.errors import ExportError
from exporter.keras_layers import KerasTarget
from exporter.keras_layers import forward as keras_forward
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


# The explained layer's output, a graph output only until keras_to_onnx resolves it.
EXPLAINED_OUTPUT = "bc_explained"
# Ops tf2onnx puts between a tensor and a graph output that returns it (layout moves;
# a Transpose that only moves 1-sized axes becomes a Reshape). The parity gate compares
# the activations, so a wrong pick could not ship.
_PASS_THROUGH = ("Identity", "Transpose", "Reshape")
# (layout after a Transpose, its perm) -> the layout before it
_BEFORE_TRANSPOSE: dict[tuple[str, tuple[int, ...]], Layout] = {
    ("nhwc", (0, 2, 3, 1)): "nchw",
    ("nchw", (0, 3, 1, 2)): "nhwc",
    ("nhwc", (0, 1, 2, 3)): "nhwc",
}


@dataclass
class KerasOnnx:
    model: onnx.ModelProto  # image -> probabilities (softmax, or one sigmoid unit)
    explained: str  # the tensor the Keras layer's output became
    layout: Layout | None  # its layout, when the ops between it and the output tell


def keras_to_onnx(
    model: Any, target: KerasTarget, input_shape: tuple[int, int, int], opset: int
) -> KerasOnnx:
    """The whole Keras model's forward pass as ONNX, with the ONNX tensor its explained
    layer's output became. Its output is the softmax of the logits (the sigmoid of a
    single unit), whatever the model's own last activation: exporter/onnx_grad reads
    the class scores back through it."""

    @tf.function(
        input_signature=[tf.TensorSpec([None, *input_shape], tf.float32, name=IMAGE_INPUT)],
        autograph=False,
    )
    def classifier(image: tf.Tensor) -> dict[str, tf.Tensor]:
        scores, tap = keras_forward(model, target, image, two_way_scores=False)
        probabilities = (tf.sigmoid(scores) if target.num_outputs == 1
                         else tf.nn.softmax(scores, axis=-1))
        return {PROBABILITIES_OUTPUT: probabilities, EXPLAINED_OUTPUT: tap.activations}

    proto = to_onnx(classifier, opset)
    return KerasOnnx(proto, *_resolve_explained(proto))


def _resolve_explained(proto: onnx.ModelProto) -> tuple[str, Layout | None]:
    """Drop the explained output and return the tensor on the model's own path it reads:
    tf2onnx returns it through an Identity or a Transpose back to NHWC when the
    convolutions before it run NCHW."""
    graph = proto.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    name = EXPLAINED_OUTPUT
    layout: Layout | None = "nhwc"  # the Keras layer's own output
    while consumers.get(name, 0) == 0 and name in producers:
        node = producers[name]
        if node.op_type not in _PASS_THROUGH:
            break
        if node.op_type == "Reshape":
            layout = None  # the builder reads it from the ops before
        elif node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [])
            layout = _BEFORE_TRANSPOSE.get((layout, tuple(perm))) if layout else None
        name = node.input[0]
    if consumers.get(name, 0) == 0:
        raise ExportError("the explained layer's output is not on the model's path in the "
                          "converted ONNX graph")
    (output,) = [o for o in graph.output if o.name == EXPLAINED_OUTPUT]
    graph.output.remove(output)
    return name, layout
