"""One backward rule per ONNX op type: output gradients -> input gradients.

A rule gets the forward node and the gradient of each of its outputs (None where
nothing downstream depends on that output) and returns one gradient per input
(None for inputs that carry none: weights, shapes, axes). Rules emit plain ONNX ops
that ONNX Runtime runs on any provider; static sizes come from shape inference.

Conventions at kinks and ties, chosen to match PyTorch and TensorFlow:
- Relu: gradient 0 at x = 0 (both frameworks). LeakyRelu: slope alpha at x = 0.
- Clip (ReLU6, hardtanh): 0 at the bounds, as torch's hardtanh/ReLU6 and TF's Relu6Grad.
- HardSigmoid: 0 at the bounds; HardSwish: torch's hardswish_backward.
- MaxPool: all of a window's gradient goes to its first maximum in row-major order
  (PyTorch's max_pool2d indices, ONNX Runtime's MaxPool indices, TF's MaxPoolGrad).
- ReduceMax: shared equally among tied maxima (torch.amax, tf.reduce_max).
- GlobalMaxPool, where the frameworks differ: PyTorch's AdaptiveMaxPool2d(1) sends the
  gradient to the first maximum, Keras' GlobalMaxPooling2D (tf.reduce_max, which tf2onnx
  writes as GlobalMaxPool) shares it; the graph's producer decides (GraphInfo.ties).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from exporter.errors import ExportError
from exporter.onnx_grad.emit import Emitter
from exporter.onnx_grad.graph import (
    GraphInfo,
    attr_float,
    attr_int,
    attr_ints,
    attr_str,
    node_label,
)

Grads = list[str | None]
RuleFn = Callable[[Emitter, onnx.NodeProto, Grads], Grads]


@dataclass(frozen=True)
class Rule:
    fn: RuleFn
    # Inputs a gradient flows into; the others (weights, shapes, axes) must not
    # depend on the explained tensor. None: every input.
    diff_inputs: tuple[int, ...] | None = (0,)


RULES: dict[str, Rule] = {}

# Ops whose outputs carry no gradient (integer, boolean or shape results).
NON_DIFFERENTIABLE = frozenset(
    {"Shape", "Size", "ArgMax", "ArgMin", "Equal", "Greater", "Less", "GreaterOrEqual",
     "LessOrEqual", "Not", "And", "Or", "Xor", "NonZero", "ConstantOfShape", "Floor", "Ceil",
     "Round", "Sign", "IsNaN", "IsInf", "Range", "EyeLike", "RandomNormalLike",
     "RandomUniformLike", "Constant"}
)


def rule(*ops: str, diff_inputs: tuple[int, ...] | None = (0,)) -> Callable[[RuleFn], RuleFn]:
    def register(fn: RuleFn) -> RuleFn:
        for op in ops:
            RULES[op] = Rule(fn, diff_inputs)
        return fn

    return register


def _fail(node: onnx.NodeProto, why: str) -> ExportError:
    return ExportError(f"{node.op_type} node {node_label(node)!r}: {why}")


def _axes(info: GraphInfo, node: onnx.NodeProto, rank: int) -> list[int] | None:
    """Axes of a Reduce* node (attribute before opset 18, else input 1); None = all."""
    axes = attr_ints(node, "axes") if info.opset < 18 and node.op_type != "ReduceSum" else []
    if not axes:
        value = info.optional_const(node, 1, "axes")
        axes = [] if value is None else [int(a) for a in value.reshape(-1)]
    if not axes:
        if attr_int(node, "noop_with_empty_axes", 0):
            return []
        return None
    return sorted(a % rank for a in axes)


# --- identity-like ---------------------------------------------------------------------


@rule("Identity", "Dropout")
def _identity(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    return [g[0]]


@rule("Cast")
def _cast(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    assert g[0] is not None
    return [em.node("Cast", [g[0]], to=em.info.dtypes.get(node.input[0], onnx.TensorProto.FLOAT))]


@rule("Flatten", "Reshape", "Squeeze", "Unsqueeze")
def _reshape(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    assert g[0] is not None
    return [em.reshape_like(g[0], node.input[0])]


@rule("Transpose")
def _transpose(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    rank = em.info.rank(node.input[0])
    perm = attr_ints(node, "perm") or list(reversed(range(rank)))
    inverse = [int(i) for i in np.argsort(perm)]
    assert g[0] is not None
    return [em.node("Transpose", [g[0]], perm=inverse)]


@rule("Expand")
def _expand(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    assert g[0] is not None
    return [em.unbroadcast(g[0], em.info.shape(node.output[0]), node.input[0])]


# --- elementwise activations ------------------------------------------------------------


@rule("Relu")
def _relu(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    assert g[0] is not None
    positive = em.node("Greater", [node.input[0], em.const(0.0)])
    return [em.where_mask(positive, g[0])]


@rule("LeakyRelu")
def _leaky_relu(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    assert g[0] is not None
    alpha = attr_float(node, "alpha", 0.01)
    positive = em.node("Greater", [node.input[0], em.const(0.0)])
    return [em.node("Where", [positive, g[0], em.node("Mul", [g[0], em.const(alpha)])])]


@rule("Sigmoid")
def _sigmoid(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    assert g[0] is not None
    y = node.output[0]
    slope = em.node("Mul", [y, em.node("Sub", [em.const(1.0), y])])
    return [em.node("Mul", [g[0], slope])]


@rule("Tanh")
def _tanh(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    assert g[0] is not None
    y = node.output[0]
    slope = em.node("Sub", [em.const(1.0), em.node("Mul", [y, y])])
    return [em.node("Mul", [g[0], slope])]


@rule("Exp")
def _exp(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    assert g[0] is not None
    return [em.node("Mul", [g[0], node.output[0]])]


@rule("Log")
def _log(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    assert g[0] is not None
    return [em.node("Div", [g[0], node.input[0]])]


@rule("Neg")
def _neg(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    assert g[0] is not None
    return [em.node("Neg", [g[0]])]


@rule("Sqrt")
def _sqrt(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    assert g[0] is not None
    return [em.node("Div", [g[0], em.node("Mul", [node.output[0], em.const(2.0)])])]


def _open_interval(em: Emitter, x: str, low: float | None, high: float | None) -> str | None:
    """Boolean low < x < high (either bound may be absent); None if both are."""
    cond = None
    if low is not None:
        cond = em.node("Greater", [x, em.const(low)])
    if high is not None:
        below = em.node("Less", [x, em.const(high)])
        cond = below if cond is None else em.node("And", [cond, below])
    return cond


@rule("HardSigmoid")
def _hard_sigmoid(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    assert g[0] is not None
    alpha, beta = attr_float(node, "alpha", 0.2), attr_float(node, "beta", 0.5)
    pre = em.node("Add", [em.node("Mul", [node.input[0], em.const(alpha)]), em.const(beta)])
    inside = _open_interval(em, pre, 0.0, 1.0)
    assert inside is not None
    return [em.where_mask(inside, em.node("Mul", [g[0], em.const(alpha)]))]


@rule("HardSwish")
def _hard_swish(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    # torch: x < -3 -> 0; x <= 3 -> g * (x/3 + 1/2); else g.
    assert g[0] is not None
    x = node.input[0]
    slope = em.node("Add", [em.node("Div", [x, em.const(3.0)]), em.const(0.5)])
    middle = em.node("Where", [em.node("LessOrEqual", [x, em.const(3.0)]), slope, em.const(1.0)])
    middle = em.node("Where", [em.node("Less", [x, em.const(-3.0)]), em.const(0.0), middle])
    return [em.node("Mul", [g[0], middle])]


@rule("Clip")
def _clip(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    assert g[0] is not None
    info = em.info
    low: float | None
    high: float | None
    if info.opset < 11:
        low, high = attr_float(node, "min", -np.inf), attr_float(node, "max", np.inf)
    else:
        lo, hi = info.optional_const(node, 1, "min"), info.optional_const(node, 2, "max")
        low = None if lo is None else float(lo)
        high = None if hi is None else float(hi)
    low = None if low is None or np.isinf(low) else low
    high = None if high is None or np.isinf(high) else high
    inside = _open_interval(em, node.input[0], low, high)
    return [g[0] if inside is None else em.where_mask(inside, g[0])]


@rule("Softmax", "LogSoftmax")
def _softmax(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    assert g[0] is not None
    rank = em.info.rank(node.input[0])
    axis = attr_int(node, "axis", -1 if em.info.opset >= 13 else 1) % rank
    if em.info.opset < 13 and axis != rank - 1:
        raise _fail(node, "opset < 13 softmax over several axes has no rule")
    y = node.output[0]
    if node.op_type == "Softmax":  # g_x = y * (g - sum(g * y))
        total = em.reduce_sum(em.node("Mul", [g[0], y]), [axis], keepdims=True)
        return [em.node("Mul", [y, em.node("Sub", [g[0], total])])]
    # LogSoftmax: g_x = g - softmax(x) * sum(g)
    total = em.reduce_sum(g[0], [axis], keepdims=True)
    return [em.node("Sub", [g[0], em.node("Mul", [em.node("Exp", [y]), total])])]


# --- broadcasting arithmetic ---------------------------------------------------------


@rule("Add", "Sub", "Mul", "Div", diff_inputs=None)
def _arithmetic(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    assert g[0] is not None
    a, b = node.input[0], node.input[1]
    out = em.info.shape(node.output[0])
    op = node.op_type
    if op == "Add":
        ga, gb = g[0], g[0]
    elif op == "Sub":
        ga, gb = g[0], em.node("Neg", [g[0]])
    elif op == "Mul":
        ga, gb = em.node("Mul", [g[0], b]), em.node("Mul", [g[0], a])
    else:  # Div: d(a/b)/db = -(a/b)/b
        ga = em.node("Div", [g[0], b])
        gb = em.node("Neg", [em.node("Div", [em.node("Mul", [g[0], node.output[0]]), b])])
    return [em.unbroadcast(ga, out, a), em.unbroadcast(gb, out, b)]


# --- linear layers --------------------------------------------------------------------


@rule("Gemm", diff_inputs=None)
def _gemm(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    # Y = alpha * A' B' + beta * C, with A' = A^T if transA, B' = B^T if transB.
    assert g[0] is not None
    a, b = node.input[0], node.input[1]
    alpha, beta = attr_float(node, "alpha", 1.0), attr_float(node, "beta", 1.0)
    trans_a, trans_b = attr_int(node, "transA", 0), attr_int(node, "transB", 0)
    # dA' = alpha g B'^T; dB' = alpha A'^T g
    ga = em.node("Gemm", [g[0], b], alpha=alpha, transB=0 if trans_b else 1)
    if trans_a:
        ga = em.node("Transpose", [ga], perm=[1, 0])
    gb = em.node("Gemm", [a, g[0]], alpha=alpha, transA=0 if trans_a else 1)
    if trans_b:
        gb = em.node("Transpose", [gb], perm=[1, 0])
    grads: Grads = [ga, gb]
    if len(node.input) > 2 and node.input[2]:
        scaled = g[0] if beta == 1.0 else em.node("Mul", [g[0], em.const(beta)])
        grads.append(em.unbroadcast(scaled, em.info.shape(node.output[0]), node.input[2]))
    return grads


def _swap_last(em: Emitter, x: str, rank: int) -> str:
    perm = list(range(rank))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    return em.node("Transpose", [x], perm=perm)


@rule("MatMul", diff_inputs=None)
def _matmul(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    assert g[0] is not None
    a, b = node.input[0], node.input[1]
    ra, rb = em.info.rank(a), em.info.rank(b)
    if ra < 2 or rb < 2:
        raise _fail(node, "MatMul with a 1-D operand has no rule")
    out = em.info.shape(node.output[0])
    ga = em.node("MatMul", [g[0], _swap_last(em, b, rb)])
    gb = em.node("MatMul", [_swap_last(em, a, ra), g[0]])
    return [em.unbroadcast(ga, out, a), em.unbroadcast(gb, out, b)]


@rule("BatchNormalization")
def _batch_norm(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    # Inference mode: y = (x - mean) / sqrt(var + eps) * scale + bias, per channel (axis 1).
    assert g[0] is not None
    if attr_int(node, "training_mode", 0):
        raise _fail(node, "training-mode BatchNormalization has no rule (export in eval mode)")
    eps = attr_float(node, "epsilon", 1e-5)
    scale, var = node.input[1], node.input[4]
    factor = em.node("Div", [scale, em.node("Sqrt", [em.node("Add", [var, em.const(eps)])])])
    rank = em.info.rank(node.input[0])
    factor = em.node("Reshape", [factor, em.ints([1, -1] + [1] * (rank - 2))])
    return [em.node("Mul", [g[0], factor])]


# --- convolution and pooling: geometry ------------------------------------------------


@dataclass(frozen=True)
class Window:
    """Sliding-window geometry over the spatial axes, pads made explicit."""

    kernel: list[int]
    strides: list[int]
    dilations: list[int]
    begin: list[int]
    end: list[int]
    size_in: list[int]
    size_out: list[int]

    def transpose_attrs(self) -> dict[str, object]:
        """ConvTranspose pads/output_padding that give back exactly `size_in`."""
        pads_end, output_padding = [], []
        for k, s, d, b, e, n, o in zip(
            self.kernel, self.strides, self.dilations, self.begin, self.end,
            self.size_in, self.size_out, strict=True,
        ):
            full = s * (o - 1) + (k - 1) * d + 1 - b - e
            if full > n:  # windows overhang the end (ceil_mode): crop the extra
                pads_end.append(e + full - n)
                output_padding.append(0)
            else:  # trailing inputs no window reached get a zero gradient
                pads_end.append(e)
                output_padding.append(n - full)
        return {
            "strides": self.strides,
            "dilations": self.dilations,
            "pads": self.begin + pads_end,
            "output_padding": output_padding,
        }


def _window(em: Emitter, node: onnx.NodeProto, kernel: list[int]) -> Window:
    x, y = node.input[0], node.output[0]
    n_sp = len(kernel)
    size_in = em.info.static_dims(x, list(range(2, 2 + n_sp)), node)
    size_out = em.info.static_dims(y, list(range(2, 2 + n_sp)), node)
    strides = attr_ints(node, "strides", [1] * n_sp)
    dilations = attr_ints(node, "dilations", [1] * n_sp)
    auto_pad = attr_str(node, "auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", "VALID"):
        pads = attr_ints(node, "pads", [0] * 2 * n_sp) if auto_pad == "NOTSET" else [0] * 2 * n_sp
        begin, end = pads[:n_sp], pads[n_sp:]
    else:  # SAME_UPPER / SAME_LOWER: the total pad that makes out = ceil(in / stride)
        begin, end = [], []
        for k, s, d, n, o in zip(kernel, strides, dilations, size_in, size_out, strict=True):
            total = max((o - 1) * s + (k - 1) * d + 1 - n, 0)
            small, big = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else big)
            end.append(big if auto_pad == "SAME_UPPER" else small)
    return Window(kernel, strides, dilations, begin, end, size_in, size_out)


@rule("Conv")
def _conv(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    # The gradient of a convolution w.r.t. its input is the transposed convolution with
    # the same weights: ONNX's ConvTranspose takes W [C_out, C_in/group, k...] as is.
    assert g[0] is not None
    w = node.input[1]
    kernel = attr_ints(node, "kernel_shape") or em.info.static_dims(
        w, list(range(2, em.info.rank(w))), node
    )
    win = _window(em, node, kernel)
    group = attr_int(node, "group", 1)
    flipped = _flipped_conv(em, g[0], w, win, group)
    if flipped is not None:
        return [flipped]
    return [em.make("ConvTranspose", [g[0], w], {"group": group, **win.transpose_attrs()})[0]]


def _flipped_conv(em: Emitter, g: str, w: str, win: Window, group: int) -> str | None:
    """A stride-1, undilated, ungrouped 2-D convolution's input gradient as a plain Conv
    with the kernel flipped in space and its channel axes swapped (padded k-1-p): the
    same sums, in ONNX Runtime's blocked Conv kernel, ~2x faster than its ConvTranspose.
    The flip reads a constant kernel, so ONNX Runtime folds it at load. None: not such
    a convolution."""
    if (len(win.kernel) != 2 or win.strides != [1, 1] or win.dilations != [1, 1]
            or group != 1 or w not in em.info.constants):
        return None
    pads = [k - 1 - b for k, b in zip(win.kernel, win.begin, strict=True)] + [
        k - 1 - e for k, e in zip(win.kernel, win.end, strict=True)]
    if any(p < 0 for p in pads):
        return None
    swapped = em.node("Transpose", [w], perm=[1, 0, 2, 3])
    big = 2**62
    kernel = em.node("Slice", [swapped, em.ints([-1, -1]), em.ints([-big, -big]),
                               em.ints([2, 3]), em.ints([-1, -1])])
    return em.node("Conv", [g, kernel], pads=pads)


@rule("AveragePool")
def _average_pool(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    # y = window sum of the real inputs / D. 1/D per output position is read from the
    # op itself (ONNX Runtime on ones), so count_include_pad and ceil_mode follow the
    # runtime exactly; the sum's adjoint is a depthwise ConvTranspose with ones.
    assert g[0] is not None
    kernel = attr_ints(node, "kernel_shape")
    win = _window(em, node, kernel)
    if any(d != 1 for d in win.dilations):
        raise _fail(node, "dilated AveragePool has no rule")
    channels = em.info.static_dims(node.input[0], [1], node)[0]
    inverse_divisor = _ones_response(node, win) / np.maximum(_valid_counts(win), 1)
    scaled = em.node("Mul", [g[0], em.const(inverse_divisor[None, None])])
    ones = em.const(np.ones([channels, 1, *kernel], np.float32))
    attrs = {"group": channels, **win.transpose_attrs()}
    return [em.make("ConvTranspose", [scaled, ones], attrs)[0]]


def _valid_counts(win: Window) -> np.ndarray:
    """How many real (non-pad) inputs each output window covers."""
    per_axis = []
    for k, s, b, n, o in zip(win.kernel, win.strides, win.begin, win.size_in, win.size_out,
                             strict=True):
        starts = np.arange(o) * s - b
        taps = starts[:, None] + np.arange(k)[None, :]
        per_axis.append(((taps >= 0) & (taps < n)).sum(axis=1))
    counts = per_axis[0].astype(np.float64)
    for axis_counts in per_axis[1:]:
        counts = np.multiply.outer(counts, axis_counts)
    return counts


def _ones_response(node: onnx.NodeProto, win: Window) -> np.ndarray:
    """The AveragePool node's output on an all-ones input (one image, one channel)."""
    import onnxruntime as ort
    from onnx import helper

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, *win.size_in])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    single = helper.make_node("AveragePool", ["x"], ["y"])
    single.attribute.extend(node.attribute)
    model = helper.make_model(
        helper.make_graph([single], "pool", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": np.ones([1, 1, *win.size_in], np.float32)})
    return np.asarray(out, np.float64)[0, 0]


@rule("MaxPool")
def _max_pool(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    assert g[0] is not None
    kernel = attr_ints(node, "kernel_shape")
    blocks = _max_pool_blocks(em, node, g[0], _window(em, node, kernel))
    return [blocks] if blocks is not None else _max_pool_scatter(em, node, g)


def _max_pool_blocks(em: Emitter, node: onnx.NodeProto, g: str, win: Window) -> str | None:
    """Square windows that tile the input (kernel == stride, VGG's 2x2/2): SpaceToDepth
    lays each window along a new axis in row-major order, ArgMax picks its first
    maximum, and DepthToSpace puts the one-hot gradient back. The forward MaxPool keeps
    ONNX Runtime's fast kernel (no indices output) and no scatter runs: ~3x cheaper than
    the general rule. None: not such a pool."""
    k = win.kernel[0]
    square = len(win.kernel) == 2 and win.kernel == [k, k] and win.strides == [k, k]
    if not square or win.dilations != [1, 1] or any(win.begin) or any(win.end):
        return None
    (oh, ow), (h, w) = win.size_out, win.size_in
    if oh * k > h or ow * k > w:  # ceil_mode windows overhanging the input
        return None
    x = node.input[0]
    channels = em.info.static_dims(x, [1], node)[0]
    if oh * k < h or ow * k < w:  # rows/columns no window reaches (floor mode)
        x = em.node("Slice", [x, em.ints([0, 0]), em.ints([oh * k, ow * k]), em.ints([2, 3])])
    # SpaceToDepth: channel (i*k + j)*C + c holds x[c, h*k + i, w*k + j]
    windows = em.node("Reshape", [em.node("SpaceToDepth", [x], blocksize=k),
                                  em.ints([0, k * k, channels, oh, ow])])
    first = em.node("ArgMax", [windows], axis=1, keepdims=1, select_last_index=0)
    positions = em.const(np.arange(k * k).reshape(1, k * k, 1, 1, 1), np.int64)
    one_hot = em.node("Cast", [em.node("Equal", [first, positions])], to=onnx.TensorProto.FLOAT)
    spread = em.node("Mul", [one_hot, em.node("Unsqueeze", [g, em.ints([1])])])
    merged = em.node("Reshape", [spread, em.ints([0, k * k * channels, oh, ow])])
    grad = em.node("DepthToSpace", [merged], blocksize=k, mode="DCR")
    if oh * k < h or ow * k < w:
        grad = em.node("Pad", [grad, em.ints([0, 0, 0, 0, 0, 0, h - oh * k, w - ow * k])])
    return grad


def _max_pool_scatter(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    # The forward node also returns its argmax indices (flat over the whole tensor, the
    # first maximum of each window), and the gradient is scatter-added there:
    # overlapping windows that share a maximum add up.
    assert g[0] is not None
    if attr_int(node, "storage_order", 0):
        raise _fail(node, "column-major MaxPool indices have no rule")
    if len(node.output) < 2 or not node.output[1]:
        indices = em.fresh("maxpool_indices")
        del node.output[1:]
        node.output.append(indices)
    else:
        indices = node.output[1]
    x = node.input[0]
    flat = em.ints([-1])
    zeros = em.node("ConstantOfShape", [em.node("Reshape", [em.node("Size", [x]), flat])],
                    value=onnx.helper.make_tensor("zero", onnx.TensorProto.FLOAT, [1], [0.0]))
    scattered = em.node(
        "ScatterElements",
        [zeros, em.node("Reshape", [indices, flat]), em.node("Reshape", [g[0], flat])],
        axis=0,
        reduction="add",
    )
    return [em.reshape_like(scattered, x)]


@rule("GlobalAveragePool")
def _global_average_pool(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    assert g[0] is not None
    x = node.input[0]
    spatial = em.info.static_dims(x, list(range(2, em.info.rank(x))), node)
    expanded = em.node("Expand", [g[0], em.shape_of(x)])
    return [em.node("Mul", [expanded, em.const(1.0 / float(np.prod(spatial)))])]


@rule("GlobalMaxPool")
def _global_max_pool(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    assert g[0] is not None
    x = node.input[0]
    if em.info.ties == "tensorflow":  # shared among ties, as tf.reduce_max
        mask = em.node("Cast", [em.node("Equal", [x, node.output[0]])],
                       to=onnx.TensorProto.FLOAT)
        spatial = list(range(2, em.info.rank(x)))
        share = em.node("Div", [g[0], em.reduce_sum(mask, spatial, keepdims=True)])
        return [em.node("Mul", [mask, share])]
    # First maximum (PyTorch's AdaptiveMaxPool2d(1), exported as GlobalMaxPool).
    rows = em.node("Reshape", [x, em.ints([0, 0, -1])])
    first = em.node("ArgMax", [rows], axis=2, keepdims=1, select_last_index=0)
    zeros = em.node("ConstantOfShape", [em.shape_of(rows)],
                    value=onnx.helper.make_tensor("zero", onnx.TensorProto.FLOAT, [1], [0.0]))
    values = em.node("Reshape", [g[0], em.ints([0, 0, 1])])
    scattered = em.node("ScatterElements", [zeros, first, values], axis=2)
    return [em.reshape_like(scattered, x)]


def _keepdims_grad(em: Emitter, node: onnx.NodeProto, g: str, axes: list[int]) -> str:
    """The output gradient with the reduced axes kept as size 1."""
    if attr_int(node, "keepdims", 1):
        return g
    return em.node("Unsqueeze", [g, em.ints(axes)])


def _reduce_axes(em: Emitter, node: onnx.NodeProto) -> list[int]:
    rank = em.info.rank(node.input[0])
    axes = _axes(em.info, node, rank)
    return list(range(rank)) if axes is None else axes


@rule("ReduceMean", "ReduceSum")
def _reduce_mean(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    assert g[0] is not None
    x = node.input[0]
    axes = _reduce_axes(em, node)
    if not axes:  # noop_with_empty_axes
        return [g[0]]
    expanded = em.node("Expand", [_keepdims_grad(em, node, g[0], axes), em.shape_of(x)])
    if node.op_type == "ReduceSum":
        return [expanded]
    count = float(np.prod(em.info.static_dims(x, axes, node)))
    return [em.node("Mul", [expanded, em.const(1.0 / count)])]


@rule("ReduceMax")
def _reduce_max(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    # Shared equally among tied maxima, as torch.amax and tf.reduce_max do.
    assert g[0] is not None
    x = node.input[0]
    axes = _reduce_axes(em, node)
    if not axes:
        return [g[0]]
    y = node.output[0] if attr_int(node, "keepdims", 1) else em.node(
        "Unsqueeze", [node.output[0], em.ints(axes)]
    )
    mask = em.node("Cast", [em.node("Equal", [x, y])], to=onnx.TensorProto.FLOAT)
    count = em.reduce_sum(mask, axes, keepdims=True)
    share = em.node("Div", [_keepdims_grad(em, node, g[0], axes), count])
    return [em.node("Mul", [mask, share])]


# --- slicing and joining --------------------------------------------------------------


@rule("Concat", diff_inputs=None)
def _concat(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    assert g[0] is not None
    rank = em.info.rank(node.output[0])
    axis = attr_int(node, "axis", 0) % rank
    sizes = [em.info.static_dims(i, [axis], node)[0] for i in node.input]
    parts = em.nodes("Split", [g[0], em.ints(sizes)], n_out=len(sizes), axis=axis)
    return list(parts)


@rule("Slice")
def _slice(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    # Each sliced axis: append one zero slab to the gradient and gather along the axis
    # with a static map (input position -> its row of the gradient, or the zero slab).
    assert g[0] is not None
    info, x = em.info, node.input[0]
    rank = info.rank(x)
    starts = info.const(node.input[1], node, "starts").reshape(-1)
    ends = info.const(node.input[2], node, "ends").reshape(-1)
    axes_v = info.optional_const(node, 3, "axes")
    steps_v = info.optional_const(node, 4, "steps")
    axes = list(range(len(starts))) if axes_v is None else [int(a) % rank for a in axes_v]
    steps = [1] * len(starts) if steps_v is None else [int(s) for s in steps_v.reshape(-1)]
    grad = g[0]
    for axis, start, end, step in zip(axes, starts, ends, steps, strict=True):
        dim = info.static_dims(x, [axis], node)[0]
        start, end = int(max(min(start, 2**62), -(2**62))), int(max(min(end, 2**62), -(2**62)))
        grad = take_along(em, grad, axis, list(range(dim))[slice(start, end, step)], dim, rank)
    return [grad]


def take_along(em: Emitter, g: str, axis: int, picked: list[int], dim: int, rank: int) -> str:
    """The adjoint of taking positions `picked` (static) along `axis` (size `dim`) of a
    rank-`rank` tensor: each input position gets the sum of the rows of `g` that took it."""
    if picked == list(range(dim)):
        return g
    if len(set(picked)) == len(picked):
        # Append one zero slab and gather along the axis with a static map
        # (input position -> its row of g, or the zero slab).
        index = np.full(dim, len(picked), np.int64)
        index[picked] = np.arange(len(picked))
        zero = em.node("Mul", [em.reduce_sum(g, [axis], keepdims=True), em.const(0.0)])
        padded = em.node("Concat", [g, zero], axis=axis)
        return em.node("Gather", [padded, em.const(index, np.int64)], axis=axis)
    # Repeated positions add up: a matrix product with the one-hot of the picks.
    one_hot = np.zeros((len(picked), dim), np.float32)
    np.add.at(one_hot, (np.arange(len(picked)), np.asarray(picked, np.int64)), 1.0)
    perm = [a for a in range(rank) if a != axis] + [axis]
    moved = em.node("MatMul", [em.node("Transpose", [g], perm=perm), em.const(one_hot)])
    return em.node("Transpose", [moved], perm=[int(i) for i in np.argsort(perm)])


@rule("Pad")
def _pad(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    assert g[0] is not None
    info, x = em.info, node.input[0]
    mode = attr_str(node, "mode", "constant")
    if mode != "constant":
        raise _fail(node, f"Pad mode {mode!r} has no rule (only 'constant')")
    rank = info.rank(x)
    pads = (attr_ints(node, "pads") if info.opset < 11
            else [int(p) for p in info.const(node.input[1], node, "pads").reshape(-1)])
    axes_v = info.optional_const(node, 3, "axes")
    axes = list(range(rank)) if axes_v is None else [int(a) % rank for a in axes_v]
    n = len(axes)
    if any(p < 0 for p in pads):
        raise _fail(node, "negative pads (cropping) have no rule")
    sliced = [(a, pads[i], pads[n + i]) for i, a in enumerate(axes) if pads[i] or pads[n + i]]
    if not sliced:
        return [g[0]]
    sizes = [info.static_dims(x, [a], node)[0] for a, _, _ in sliced]
    starts = [b for _, b, _ in sliced]
    ends = [b + size for (_, b, _), size in zip(sliced, sizes, strict=True)]
    axes_out = [a for a, _, _ in sliced]
    return [em.node("Slice", [g[0], em.ints(starts), em.ints(ends), em.ints(axes_out)])]


# The rules of transformers and ConvNeXt live in a module of their own and register here.
from exporter.onnx_grad import transformer_rules  # noqa: E402,F401
