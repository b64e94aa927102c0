"""Appends nodes and constants to a graph under fresh names (the backward pass's pen)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporter.onnx_grad.graph import Dim, GraphInfo

PREFIX = "bc_grad/"


class Emitter:
    def __init__(self, graph: onnx.GraphProto, info: GraphInfo) -> None:
        self.graph = graph
        self.info = info
        self._used = {t for n in graph.node for t in [*n.input, *n.output]}
        self._used |= {v.name for v in [*graph.input, *graph.output, *graph.initializer]}
        self._count = 0
        self._consts: dict[tuple[bytes, str, tuple[int, ...]], str] = {}

    def fresh(self, hint: str) -> str:
        while True:
            self._count += 1
            name = f"{PREFIX}{hint}_{self._count}"
            if name not in self._used:
                self._used.add(name)
                return name

    def node(
        self,
        op: str,
        inputs: Sequence[str],
        hint: str | None = None,
        n_out: int = 1,
        **attrs: object,
    ) -> str:
        """One node; returns its (first) output."""
        return self.nodes(op, inputs, hint, n_out, **attrs)[0]

    def nodes(
        self,
        op: str,
        inputs: Sequence[str],
        hint: str | None = None,
        n_out: int = 1,
        **attrs: object,
    ) -> list[str]:
        return self.make(op, inputs, attrs, hint, n_out)

    def make(
        self,
        op: str,
        inputs: Sequence[str],
        attrs: dict[str, object],
        hint: str | None = None,
        n_out: int = 1,
    ) -> list[str]:
        outs = [self.fresh(hint or op) for _ in range(n_out)]
        node = helper.make_node(op, list(inputs), outs, name=self.fresh(f"{op}_node"))
        node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
        self.graph.node.append(node)
        return outs

    def const(self, value: np.ndarray | Sequence[float] | float, dtype: type = np.float32) -> str:
        array: np.ndarray = np.asarray(value, dtype=dtype)
        key = (array.tobytes(), str(array.dtype), array.shape)
        if key not in self._consts:
            name = self.fresh("const")
            self.graph.initializer.append(numpy_helper.from_array(array, name))
            self._consts[key] = name
        return self._consts[key]

    def ints(self, values: Sequence[int]) -> str:
        return self.const(list(values), np.int64)

    # --- small compositions every rule uses ------------------------------------------

    def shape_of(self, x: str) -> str:
        return self.node("Shape", [x])

    def reshape_like(self, g: str, x: str) -> str:
        return self.node("Reshape", [g, self.shape_of(x)])

    def reduce_sum(self, g: str, axes: Sequence[int], keepdims: bool) -> str:
        return self.node("ReduceSum", [g, self.ints(axes)], keepdims=int(keepdims))

    def unbroadcast(self, g: str, out_shape: list[Dim], x: str) -> str:
        """Sum a gradient of the broadcast result back to the shape of operand x."""
        x_shape = self.info.shape(x)
        lead = len(out_shape) - len(x_shape)
        axes = list(range(lead)) + [
            lead + i
            for i, d in enumerate(x_shape)
            # A dim of 1 against anything else (or a symbolic dim) was broadcast;
            # summing over a size-1 axis is harmless if it was not.
            if d == 1 and out_shape[lead + i] != 1
        ]
        if not axes:
            return g
        summed = self.reduce_sum(g, axes, keepdims=True)
        return self.reshape_like(summed, x) if lead else summed

    def where_mask(self, condition: str, g: str) -> str:
        """g where condition holds, else 0 (a multiply: ORT's Where is several times slower)."""
        return self.node("Mul", [g, self.node("Cast", [condition], to=onnx.TensorProto.FLOAT)])
