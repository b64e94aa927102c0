"""Gradients that are zero but on a few rows of one axis, kept compact.

A ViT classifies from its class token: the gradient coming back from `x[:, 0]` is
zero on every patch token of the last block's output, and the rules would multiply
those zeros through the last MLP and LayerNorms at the full token count (most of a
block's cost, a sixth of the Grad-CAM graph's on ViT-B/16). Here the gradient of a
Gather/Slice along one axis stays compact ([N, 1, C] for the class token) through the
ops that treat that axis's positions independently (elementwise ops, token-wise
MatMuls with weights, LayerNorm over the channels, Transpose), by running their
ordinary rule on the picked rows of their forward tensors; it is laid out in full
(zeros elsewhere) at the first op that mixes the axis, such as attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from exporter.onnx_grad.emit import Emitter
from exporter.onnx_grad.graph import attr_int, attr_ints
from exporter.onnx_grad.rules import RULES, take_along


@dataclass(frozen=True)
class Rows:
    """`tensor` holds the gradient's rows `picked` (in order) of axis `axis` (size
    `dim`) of a rank-`rank` gradient; all its other rows are zero."""

    tensor: str
    axis: int
    picked: tuple[int, ...]
    dim: int
    rank: int


UNARY = frozenset({"Erf", "Gelu", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Exp", "Log", "Neg",
                   "Sqrt", "Reciprocal", "Cast", "Identity", "Dropout", "HardSigmoid",
                   "HardSwish", "Clip"})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow"})


def dense(em: Emitter, g: str | Rows | None) -> str | None:
    if not isinstance(g, Rows):
        return g
    return take_along(em, g.tensor, g.axis, list(g.picked), g.dim, g.rank)


def total(em: Emitter, parts: list[str | Rows]) -> str | Rows | None:
    """The sum of a tensor's gradient parts; compact if all are, on the same axis."""
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    compact = [p for p in parts if isinstance(p, Rows)]
    if len(compact) == len(parts) and len({(p.axis, p.dim, p.rank) for p in compact}) == 1:
        union = sorted({i for p in compact for i in p.picked})
        laid = [take_along(em, p.tensor, p.axis, [union.index(i) for i in p.picked],
                           len(union), p.rank) for p in compact]
        first = compact[0]
        return Rows(em.node("Sum", laid, "grad_sum"), first.axis, tuple(union), first.dim,
                    first.rank)
    dense_parts = [d for d in (dense(em, p) for p in parts) if d is not None]
    return em.node("Sum", dense_parts, "grad_sum")


def backward(em: Emitter, node: onnx.NodeProto, grads: list[str | Rows | None]
             ) -> list[str | Rows | None] | None:
    """The node's input gradients, compact where they can be; None: use the ordinary
    rule on dense gradients."""
    g = grads[0]
    if len(grads) == 1 and isinstance(g, str):
        return _start(em, node, g)
    if not isinstance(g, Rows) or any(x is not None for x in grads[1:]):
        return None
    if node.op_type == "Transpose":
        perm = attr_ints(node, "perm") or list(reversed(range(g.rank)))
        inverse = [int(i) for i in np.argsort(perm)]
        moved = em.node("Transpose", [g.tensor], perm=inverse)
        return [Rows(moved, perm[g.axis], g.picked, g.dim, g.rank)]
    if node.op_type in UNARY:
        return _shadowed(em, node, g, [0])
    if node.op_type in BINARY:
        return _shadowed(em, node, g, [0, 1])
    if node.op_type == "MatMul":
        b = node.input[1]  # token-wise only with a weight: rows of a -> rows of the output
        if g.axis != g.rank - 2 or em.info.rank(node.input[0]) != g.rank \
                or b not in em.info.constants or em.info.rank(b) != 2:
            return None
        return _shadowed(em, node, g, [0])
    if node.op_type == "LayerNormalization":
        rank = em.info.rank(node.input[0])
        if g.axis >= attr_int(node, "axis", -1) % rank:
            return None
        _with_stats(em, node)
        return _shadowed(em, node, g, [0], outputs=[0, 1, 2])
    return None


def _start(em: Emitter, node: onnx.NodeProto, g: str) -> list[str | Rows | None] | None:
    """Gather or Slice of static positions along one axis: the gradient starts compact."""
    info = em.info
    x = node.input[0]
    if x not in info.shapes:
        return None
    rank = info.rank(x)
    if node.op_type == "Gather" and node.input[1] in info.constants:
        axis = attr_int(node, "axis", 0) % rank
        indices = np.asarray(info.constants[node.input[1]], np.int64)
        dim = info.shape(x)[axis]
        if dim is None or indices.ndim > 1:
            return None
        picked = tuple(int(i) % dim for i in indices.reshape(-1))
        if len(set(picked)) != len(picked):
            return None
        compact = em.node("Unsqueeze", [g, em.ints([axis])]) if indices.ndim == 0 else g
        return [Rows(compact, axis, picked, dim, rank), None]
    return None


def _with_stats(em: Emitter, node: onnx.NodeProto) -> None:
    """The LayerNormalization node's mean and inverse std outputs, added if absent."""
    while len(node.output) < 3:
        node.output.append("")
    shape = list(em.info.shape(node.input[0]))
    rank = len(shape)
    stats_shape = shape[:attr_int(node, "axis", -1) % rank]
    stats_shape += [1] * (rank - len(stats_shape))
    for slot, hint in ((1, "ln_mean"), (2, "ln_inv_std")):
        if not node.output[slot]:
            node.output[slot] = em.fresh(hint)
        em.info.shapes.setdefault(node.output[slot], stats_shape)


def _rows_of(em: Emitter, name: str, g: Rows) -> str | None:
    """The picked rows of a forward tensor, or None where it has no such axis (it is
    broadcast along it)."""
    shape = em.info.shapes.get(name)
    if shape is None:
        return None
    axis = g.axis - g.rank + len(shape)
    if axis < 0 or shape[axis] != g.dim:
        return None
    rows = em.node("Gather", [name, em.ints(list(g.picked))], axis=axis)
    picked_shape = list(shape)
    picked_shape[axis] = len(g.picked)
    em.info.shapes[rows] = picked_shape
    if name in em.info.dtypes:
        em.info.dtypes[rows] = em.info.dtypes[name]
    return rows


def _shadowed(em: Emitter, node: onnx.NodeProto, g: Rows, inputs: list[int],
              outputs: tuple[int, ...] | list[int] = (0,)) -> list[str | Rows | None] | None:
    """The ordinary rule run on a copy of the node that reads and writes the picked
    rows of its tensors; gradients of the inputs that have the axis are compact."""
    shadow = onnx.NodeProto()
    shadow.CopyFrom(node)
    has_axis: set[int] = set()
    for i in inputs:
        if i < len(node.input) and node.input[i]:
            rows = _rows_of(em, node.input[i], g)
            if rows is not None:
                shadow.input[i] = rows
                has_axis.add(i)
    for o in outputs:
        rows = _rows_of(em, node.output[o], g) if o < len(node.output) and node.output[o] \
            else None
        if rows is None:
            return None
        shadow.output[o] = rows
    if 0 not in has_axis and node.op_type not in BINARY:
        return None
    in_grads = RULES[node.op_type].fn(em, shadow, [g.tensor])
    out: list[str | Rows | None] = []
    for i, grad in enumerate(in_grads):
        if grad is None or i not in has_axis:
            out.append(grad)  # broadcast along the axis: the rule summed it already
        else:
            out.append(Rows(grad, g.axis - g.rank + len(em.info.shapes[shadow.input[i]]),
                            g.picked, g.dim, len(em.info.shapes[shadow.input[i]])))
    return out
