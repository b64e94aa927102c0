"""Backward rules for the ops of vision transformers and ConvNeXt: LayerNormalization,
Erf and Gelu (both of torch's GELUs), Pow and Reciprocal (the tanh GELU, LayerNorms
written out by older opsets and tf2onnx), Gather and Split on tokens, Where.

Registered into `rules.RULES` when `rules` is imported (its last line imports this
module), so every consumer of the registry sees them.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from exporter.onnx_grad.emit import Emitter
from exporter.onnx_grad.graph import attr_int, attr_str
from exporter.onnx_grad.rules import Grads, _fail, rule, take_along


def _static_count(em: Emitter, node: onnx.NodeProto, x: str, axes: list[int]) -> float:
    return float(np.prod(em.info.static_dims(x, axes, node)))


def _mean(em: Emitter, t: str, axes: list[int], count: float) -> str:
    return em.node("Mul", [em.reduce_sum(t, axes, keepdims=True), em.const(1.0 / count)])


@rule("LayerNormalization")
def _layer_norm(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    # y = x̂ γ + β, x̂ = (x - μ) r, r = 1/sqrt(var + eps) over axes [axis, rank):
    # dx = r (ĝ - mean(ĝ) - x̂ mean(ĝ x̂)) with ĝ = g γ. μ and r are the forward node's
    # own optional outputs (added when absent), so nothing is recomputed.
    assert g[0] is not None
    x = node.input[0]
    rank = em.info.rank(x)
    axes = list(range(attr_int(node, "axis", -1) % rank, rank))
    count = _static_count(em, node, x, axes)
    while len(node.output) < 3:
        node.output.append("")
    for slot, hint in ((1, "ln_mean"), (2, "ln_inv_std")):
        if not node.output[slot]:
            node.output[slot] = em.fresh(hint)
    mean, inv_std = node.output[1], node.output[2]
    x_hat = em.node("Mul", [em.node("Sub", [x, mean]), inv_std])
    g_hat = em.node("Mul", [g[0], node.input[1]])
    centred = em.node("Sub", [g_hat, _mean(em, g_hat, axes, count)])
    along = em.node("Mul", [x_hat, _mean(em, em.node("Mul", [g_hat, x_hat]), axes, count)])
    return [em.node("Mul", [em.node("Sub", [centred, along]), inv_std])]


@rule("Erf")
def _erf(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    assert g[0] is not None
    x = node.input[0]
    density = em.node("Exp", [em.node("Neg", [em.node("Mul", [x, x])])])
    return [em.node("Mul", [g[0], em.node("Mul", [density, em.const(2.0 / math.sqrt(math.pi))])])]


@rule("Gelu")
def _gelu(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    assert g[0] is not None
    x = node.input[0]
    if attr_str(node, "approximate", "none") == "tanh":
        # y = x/2 (1 + t), t = tanh(c (x + k x³)): y' = (1 + t)/2 + x/2 (1 - t²) c (1 + 3k x²)
        c, k = math.sqrt(2.0 / math.pi), 0.044715
        x2 = em.node("Mul", [x, x])
        cubic = em.node("Add", [em.const(1.0), em.node("Mul", [x2, em.const(k)])])
        inner = em.node("Mul", [x, cubic])
        t = em.node("Tanh", [em.node("Mul", [inner, em.const(c)])])
        dinner = em.node("Add", [em.const(c), em.node("Mul", [x2, em.const(3 * k * c)])])
        sech2 = em.node("Sub", [em.const(1.0), em.node("Mul", [t, t])])
        slope = em.node("Add", [em.node("Add", [t, em.const(1.0)]),
                                em.node("Mul", [em.node("Mul", [x, sech2]), dinner])])
        return [em.node("Mul", [g[0], em.node("Mul", [slope, em.const(0.5)])])]
    # y = x Φ(x): y' = Φ(x) + x φ(x)
    erf = em.node("Erf", [em.node("Mul", [x, em.const(1.0 / math.sqrt(2.0))])])
    cdf = em.node("Mul", [em.node("Add", [erf, em.const(1.0)]), em.const(0.5)])
    gauss = em.node("Exp", [em.node("Mul", [em.node("Mul", [x, x]), em.const(-0.5)])])
    pdf = em.node("Mul", [gauss, em.const(1.0 / math.sqrt(2.0 * math.pi))])
    return [em.node("Mul", [g[0], em.node("Add", [cdf, em.node("Mul", [x, pdf])])])]


@rule("Pow", diff_inputs=None)
def _pow(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    # d(a^b)/da = b a^(b-1); d(a^b)/db = a^b ln a (emitted only where b is live).
    assert g[0] is not None
    info = em.info
    a, b = node.input[0], node.input[1]
    out = info.shape(node.output[0])
    if b in info.constants:
        exponent = np.asarray(info.constants[b], np.float64)
        if np.all(exponent == 2.0):
            slope = em.node("Mul", [a, em.const(2.0)])
        else:
            slope = em.node("Mul", [em.node("Pow", [a, em.const(exponent - 1.0)]),
                                    em.const(exponent)])
        return [em.unbroadcast(em.node("Mul", [g[0], slope]), out, a), None]
    if info.dtypes.get(b) != info.dtypes.get(a):
        raise _fail(node, "an exponent of another type than the base, computed at run time, "
                         "has no rule")
    minus_one = em.node("Sub", [b, em.const(1.0)])
    ga = em.node("Mul", [g[0], em.node("Mul", [em.node("Pow", [a, minus_one]), b])])
    gb = em.node("Mul", [g[0], em.node("Mul", [node.output[0], em.node("Log", [a])])])
    return [em.unbroadcast(ga, out, a), em.unbroadcast(gb, out, b)]


@rule("Reciprocal")
def _reciprocal(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    # d(1/x) = -1/x² = -y² (a decomposed LayerNorm's 1/sqrt(var + eps), tf2onnx's Rsqrt)
    assert g[0] is not None
    y = node.output[0]
    return [em.node("Neg", [em.node("Mul", [g[0], em.node("Mul", [y, y])])])]


@rule("Where", diff_inputs=(1, 2))
def _where(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    assert g[0] is not None
    cond, a, b = node.input
    out = em.info.shape(node.output[0])
    ga = em.where_mask(cond, g[0])
    gb = em.where_mask(em.node("Not", [cond]), g[0])
    return [None, em.unbroadcast(ga, out, a), em.unbroadcast(gb, out, b)]


@rule("Gather")
def _gather(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    # Constant indices (a class token, q/k/v out of a stacked projection): each input
    # position takes the sum of the output rows that picked it.
    assert g[0] is not None
    info, x = em.info, node.input[0]
    rank = info.rank(x)
    axis = attr_int(node, "axis", 0) % rank
    dim = info.static_dims(x, [axis], node)[0]
    indices = np.asarray(info.const(node.input[1], node, "indices"), np.int64)
    picked = (indices.reshape(-1) % dim).tolist()
    grad = g[0]
    if indices.ndim == 0:
        grad = em.node("Unsqueeze", [grad, em.ints([axis])])
    elif indices.ndim > 1:  # the index axes flattened into one
        shape = em.shape_of(grad)
        grad = em.node("Reshape", [grad, em.node("Concat", [
            em.node("Slice", [shape, em.ints([0]), em.ints([axis])]), em.ints([len(picked)]),
            em.node("Slice", [shape, em.ints([axis + indices.ndim]), em.ints([2**62])]),
        ], axis=0)])
    return [take_along(em, grad, axis, picked, dim, rank)]


@rule("Split")
def _split(em: Emitter, node: onnx.NodeProto, g: Grads) -> Grads:
    # The output gradients side by side; an unused output contributes zeros.
    parts = []
    for out, grad in zip(node.output, g, strict=True):
        if grad is None:
            zero = onnx.helper.make_tensor("zero", onnx.TensorProto.FLOAT, [1], [0.0])
            grad = em.node("ConstantOfShape", [em.shape_of(out)], value=zero)
        parts.append(grad)
    rank = em.info.rank(node.input[0])
    return [em.node("Concat", parts, axis=attr_int(node, "axis", 0) % rank)]

