"""Static shapes and shape-derived constants by running the graph, where ONNX shape
inference gives up.

torch.onnx writes a transformer's reshapes with their targets computed from `Shape`
at run time (`x.reshape(n, c, h * w)`, window partitions, pads and rolls sized by the
input), through ops ONNX's data propagation does not follow (Div, Cast): shape
inference then loses every dimension downstream. The image size is fixed by the model
directory's preprocessing, so these are constants in all but the batch: ONNX Runtime
runs the graph on zeros at batch 1 and 2, and reports the shape of every tensor (a
dimension that differs between the two runs depends on the batch and stays symbolic)
and the value of every tensor that is computed without reading the image's values
(only its shape) and feeds the image's path (a Reshape's target, a Pad's pads, a
Slice's starts; an attention mask).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper

from exporter.errors import ExportError
from exporter.onnx_grad.graph import session_in_place

Dim = int | None
SHAPE_ONLY = frozenset({"Shape", "Size"})  # outputs that read their input's shape, not values
MAX_VALUE_ELEMENTS = 1 << 20


def image_valued(graph: onnx.GraphProto, image: str) -> set[str]:
    """Tensors whose values depend on the image's values."""
    valued = {image}
    for node in graph.node:
        if node.op_type in SHAPE_ONLY:
            continue
        if any(i in valued for i in node.input):
            valued.update(o for o in node.output if o)
    return valued


def _feeds_image_path(graph: onnx.GraphProto, valued: set[str]) -> set[str]:
    """Non-image-valued tensors produced by nodes and read by image-valued nodes."""
    produced = {o for n in graph.node if n.op_type != "Constant" for o in n.output if o}
    wanted: set[str] = set()
    for node in graph.node:
        if any(o in valued for o in node.output):
            wanted.update(i for i in node.input if i in produced and i not in valued)
    return wanted


def probe(model: onnx.ModelProto, image: str, image_shape: list[int],
          arrays: dict[str, np.ndarray] | None = None) -> tuple[
    dict[str, list[Dim]], dict[str, np.ndarray]
]:
    """(shapes, values): the shape of every node output (None on batch-dependent axes),
    and the batch-independent values of the shape-derived tensors the image path reads.
    `arrays`: the initializers as arrays, where the caller holds them already."""
    graph = model.graph
    valued = image_valued(graph, image)
    value_names = sorted(_feeds_image_path(graph, valued))
    # Each tensor's Shape right after its producer, run in that order (priority): ORT
    # frees the tensor as the model's own run would; its default order holds every
    # activation until the end (+0.9 GB on a ViT-B/16 at batch 2).
    shape_of: dict[str, str] = {}
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for name in (o for o in node.output if o):
            shape_of[name] = f"bc_probe/shape_{len(shape_of)}"
            nodes.append(helper.make_node("Shape", [name], [shape_of[name]]))
    wanted = [*shape_of.values(), *value_names]
    try:
        session = session_in_place(model, wanted, arrays, nodes, priority=True)
        runs = [dict(zip(wanted, session.run(wanted, {
            image: np.zeros([batch, *image_shape], np.float32)}), strict=True))
            for batch in (1, 2)]
    except Exception as exc:  # ORT's own errors: the graph does not run at this size
        raise ExportError(f"ONNX Runtime could not run the model on a {image_shape} image to "
                          f"read its tensor shapes ({type(exc).__name__}: {exc})") from exc
    shapes: dict[str, list[Dim]] = {}
    for name, probe_name in shape_of.items():
        one, two = (np.asarray(r[probe_name]).tolist() for r in runs)
        if len(one) == len(two):
            shapes[name] = [a if a == b else None for a, b in zip(one, two, strict=True)]
    values: dict[str, np.ndarray] = {}
    for name in value_names:
        one, two = (np.asarray(r[name]) for r in runs)
        if one.size <= MAX_VALUE_ELEMENTS and one.shape == two.shape and _equal(one, two):
            values[name] = one
    return shapes, values


def _equal(a: Any, b: Any) -> bool:
    return bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))
