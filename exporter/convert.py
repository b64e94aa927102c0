"""tf.function -> ONNX with tf2onnx, plus the checks tf2onnx does not do itself."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import tf2onnx
from onnx import TensorProto
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


CUSTOM_OP_HANDLERS = {"ReluGrad": (_relu_grad, [])}


def to_onnx(fn: Callable[..., Any], opset: int) -> onnx.ModelProto:
    if not 13 <= opset <= MAX_OPSET:
        raise ExportError(f"opset must be between 13 and {MAX_OPSET}, got {opset}")
    model, _ = tf2onnx.convert.from_function(
        fn,
        input_signature=fn.input_signature,  # type: ignore[attr-defined]
        opset=opset,
        custom_op_handlers=CUSTOM_OP_HANDLERS,
    )
    model.producer_name = "braincam-exporter"
    return model


def check(model: onnx.ModelProto, what: str) -> None:
    """Structural validity: tf2onnx can emit unconverted ops silently."""
    foreign = sorted({n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise ExportError(f"{what}: unconverted TensorFlow ops left in the graph: {', '.join(foreign)}")
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{what}: onnx.checker rejected the graph: {exc}") from exc
