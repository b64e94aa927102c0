"""Float64-exact kernels for onnx.reference, where its own lose precision.

onnx.reference's Erf rounds through float32 (np.vectorize(math.erf, otypes="f")), and
its Gelu expands into that Erf: a float64 finite difference across them measures the
rounding (1e-2 relative), not the gradient. These compute in the input's dtype
(scipy's erf, vectorised) and are passed as `new_ops` wherever the exporter evaluates
a graph in float64.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from onnx.reference.op_run import OpRun
from scipy.special import erf


class Erf(OpRun):
    op_domain = ""

    def _run(self, x: np.ndarray) -> tuple[np.ndarray]:
        return (erf(x).astype(x.dtype),)


class Gelu(OpRun):
    op_domain = ""

    def _run(self, x: np.ndarray, approximate: Any = None) -> tuple[np.ndarray]:
        mode = approximate.decode() if isinstance(approximate, bytes) else approximate
        if mode == "tanh":
            inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)
            return ((0.5 * x * (1.0 + np.tanh(inner))).astype(x.dtype),)
        return ((0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))).astype(x.dtype),)


FLOAT64_OPS: list[type[OpRun]] = [Erf, Gelu]
