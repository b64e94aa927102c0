"""Edits of an exported ONNX classifier that put trust into the graph itself.

Every function works on a plain `onnx.ModelProto` given tensor names (the penultimate
features [N,D] and the pre-softmax logits [N,K]) that the ONNX-level builder finds
(exporter/onnx_grad/anatomy.py) for both exporters.

- `apply_temperature`: `probabilities` becomes Softmax(logits / T).
- `append_mahalanobis` / `append_energy`: an `ood_score` [N] output.
- `append_grid_features`: the explained feature map averaged on a coarse grid.
- `tensor_values`: run the graph in ONNX Runtime to read internal tensors (the fit).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from braincam.model_spec import OOD_SCORE_OUTPUT

_PREFIX = "braincam_trust"
GRID = 2  # the grid features' cells per side (append_grid_features)


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _reduce(
    model: onnx.ModelProto, op: str, x: str, axis: int, out: str, keepdims: int = 0
) -> onnx.NodeProto:
    """Reduce* over one axis: an attribute before opset 18, an input from 18 on."""
    if _opset(model) >= 18:
        axes = f"{out}_axes"
        model.graph.initializer.append(numpy_helper.from_array(np.array([axis], np.int64), axes))
        return helper.make_node(op, [x, axes], [out], keepdims=keepdims, name=out)
    return helper.make_node(op, [x], [out], axes=[axis], keepdims=keepdims, name=out)


def _graph_output(model: onnx.ModelProto, name: str) -> onnx.ValueInfoProto | None:
    return next((o for o in model.graph.output if o.name == name), None)


def _producer(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    for node in model.graph.node:
        if name in node.output:
            return node
    raise ValueError(f"no node of the graph produces '{name}'")


def remove_outputs(model: onnx.ModelProto, names: Iterable[str]) -> None:
    """Drop graph outputs (their tensors stay while something consumes them), then prune."""
    drop = set(names)
    for out in [o for o in model.graph.output if o.name in drop]:
        model.graph.output.remove(out)
    prune(model)


def _consumed(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    names: set[str] = set()
    for node in nodes:
        names.update(node.input)
        for attr in node.attribute:  # names a control-flow subgraph reads from outside
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                names.update(_consumed(sub.node))
    return names


def prune(model: onnx.ModelProto) -> None:
    """Remove nodes and initializers no graph output depends on."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    keep: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            keep.append(node)
            needed |= _consumed([node])
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    for init in [i for i in graph.initializer if i.name not in needed]:
        graph.initializer.remove(init)


def apply_temperature(
    model: onnx.ModelProto, logits: str, probabilities: str, temperature: float
) -> None:
    """Make the output `probabilities` Softmax(logits / T); the old softmax is pruned.

    Nothing else changes: a Grad-CAM graph's class choice and gradients read `logits`
    itself (the logits' ranking is the same at any T).
    """
    if _graph_output(model, probabilities) is None:
        raise ValueError(f"the graph has no output '{probabilities}'")
    old = _producer(model, probabilities)
    renamed = f"{_PREFIX}_uncalibrated_{probabilities}"
    old.output[list(old.output).index(probabilities)] = renamed
    t = f"{_PREFIX}_temperature"
    scaled = f"{_PREFIX}_scaled_logits"
    model.graph.initializer.append(numpy_helper.from_array(np.array(temperature, np.float32), t))
    model.graph.node.extend([
        helper.make_node("Div", [logits, t], [scaled], name=scaled),
        helper.make_node("Softmax", [scaled], [probabilities], axis=-1, name=f"{_PREFIX}_softmax"),
    ])
    prune(model)


def _add_score_output(model: onnx.ModelProto, name: str) -> None:
    if _graph_output(model, name) is not None:
        raise ValueError(f"the graph already has an output '{name}'")
    model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [None]))


def append_mahalanobis(
    model: onnx.ModelProto,
    features: str,
    means: np.ndarray,
    scale: float,
    basis: np.ndarray,
    output: str = OOD_SCORE_OUTPUT,
) -> None:
    """`output` [N] = min_k s·||f − μ_k||² − ||(f − μ_k) U||², i.e. (f − μ_k)ᵀ P (f − μ_k)
    with the precision P = s·I − U Uᵀ (braincam.ood.mahalanobis_score).

    f − μ_k is [N,K,D] (K classes: cheap); the projection goes through one MatMul
    f·U [N,r], with the μ_k U folded into a constant [K,r].
    """
    p = f"{_PREFIX}_maha"
    basis64 = np.asarray(basis, np.float64)
    g = model.graph
    g.initializer.extend([
        numpy_helper.from_array(np.asarray(means, np.float32), f"{p}_means"),
        numpy_helper.from_array(np.ascontiguousarray(basis64, np.float32), f"{p}_basis"),
        numpy_helper.from_array((np.asarray(means, np.float64) @ basis64).astype(np.float32),
                                f"{p}_centres"),
        numpy_helper.from_array(np.array(scale, np.float32), f"{p}_scale"),
        numpy_helper.from_array(np.array([1], np.int64), f"{p}_axis1"),
    ])
    g.node.extend([
        helper.make_node("Unsqueeze", [features, f"{p}_axis1"], [f"{p}_f"], name=f"{p}_unsq_f"),
        helper.make_node("Sub", [f"{p}_f", f"{p}_means"], [f"{p}_diff"], name=f"{p}_sub"),
        _reduce(model, "ReduceSumSquare", f"{p}_diff", 2, f"{p}_dist"),
        helper.make_node("Mul", [f"{p}_dist", f"{p}_scale"], [f"{p}_iso"], name=f"{p}_mul"),
        helper.make_node("MatMul", [features, f"{p}_basis"], [f"{p}_proj"], name=f"{p}_mm"),
        helper.make_node(
            "Unsqueeze", [f"{p}_proj", f"{p}_axis1"], [f"{p}_proj_k"], name=f"{p}_unsq_p"
        ),
        helper.make_node("Sub", [f"{p}_proj_k", f"{p}_centres"], [f"{p}_pdiff"], name=f"{p}_psub"),
        _reduce(model, "ReduceSumSquare", f"{p}_pdiff", 2, f"{p}_low"),
        helper.make_node("Sub", [f"{p}_iso", f"{p}_low"], [f"{p}_scores"], name=f"{p}_score"),
        _reduce(model, "ReduceMin", f"{p}_scores", 1, output),
    ])
    _add_score_output(model, output)


def append_energy(model: onnx.ModelProto, logits: str, output: str = OOD_SCORE_OUTPUT) -> None:
    """`output` [N] = −logsumexp(logits): the energy score."""
    p = f"{_PREFIX}_energy"
    model.graph.node.extend([
        _reduce(model, "ReduceLogSumExp", logits, 1, f"{p}_lse"),
        helper.make_node("Neg", [f"{p}_lse"], [output], name=f"{p}_neg"),
    ])
    _add_score_output(model, output)


def expose(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy whose graph outputs include the internal tensors `names`."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for name in names:
        if _graph_output(copy, name) is None:
            copy.graph.output.append(helper.make_empty_tensor_value_info(name))
    return copy


def tensor_values(
    model: onnx.ModelProto, x: np.ndarray, names: Sequence[str], batch_size: int = 64
) -> list[np.ndarray]:
    """Run `model` (weights inline) on x [N,H,W,C] in ORT, CPU; -> one array per name."""
    import onnxruntime as ort

    from braincam.model_spec import IMAGE_INPUT

    session = ort.InferenceSession(
        expose(model, names).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for start in range(0, len(x), batch_size):
        got = session.run(list(names), {IMAGE_INPUT: x[start : start + batch_size]})
        for part, value in zip(parts, got, strict=True):
            part.append(np.asarray(value))
    return [np.concatenate(p) for p in parts]


def grid_weights(h: int, w: int, grid: int) -> np.ndarray:
    """[g·g, h·w]: row r averages cell r of a g x g grid (rows first) of an h x w map.

    Global pooling forgets where things are, so a rotated or cropped scan keeps the
    statistics of a normal one; a coarse grid keeps the layout (trainer.ood_eval
    measures the difference). Rows and columns beyond a multiple of g are left out.
    """
    g = max(1, min(grid, h, w))
    bh, bw = h // g, w // g
    weights = np.zeros((g * g, h * w), np.float32)
    for cell in range(g * g):
        r, q = divmod(cell, g)
        mask = np.zeros((h, w), np.float32)
        mask[r * bh : (r + 1) * bh, q * bw : (q + 1) * bw] = 1.0 / (bh * bw)
        weights[cell] = mask.reshape(-1)
    return weights


def grid_pool(acts: np.ndarray, grid: int) -> np.ndarray:
    """NumPy reference of `append_grid_features`: [N,h,w,C] -> [N, g·g·C]."""
    n, h, w, c = acts.shape
    cells = grid_weights(h, w, grid) @ acts.reshape(n, h * w, c)
    return cells.reshape(n, -1)


def append_grid_features(
    model: onnx.ModelProto, maps: str, shape_hwc: Sequence[int], nchw: bool, grid: int,
    output: str,
) -> None:
    """A graph output `output` [N, g·g·C]: the feature map `maps` averaged on a g x g grid.
    One MatMul with a constant averaging matrix: in ONNX Runtime a third of the time of
    a ReduceMean over a 6-D reshape."""
    h, w, c = (int(d) for d in shape_hwc)
    weights = grid_weights(h, w, grid)
    p = f"{_PREFIX}_grid"
    inits = {
        f"{p}_weights": weights,
        f"{p}_flat": np.array([-1, h * w, c], np.int64),
        f"{p}_cells": np.array([-1, weights.shape[0] * c], np.int64),
    }
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in inits.items())
    nodes = []
    if nchw:
        nodes.append(helper.make_node("Transpose", [maps], [f"{p}_nhwc"], perm=[0, 2, 3, 1],
                                      name=f"{p}_nhwc"))
        maps = f"{p}_nhwc"
    nodes += [
        helper.make_node("Reshape", [maps, f"{p}_flat"], [f"{p}_flat_out"], name=f"{p}_reshape"),
        helper.make_node("MatMul", [f"{p}_weights", f"{p}_flat_out"], [f"{p}_mean"],
                         name=f"{p}_matmul"),
        helper.make_node("Reshape", [f"{p}_mean", f"{p}_cells"], [output], name=f"{p}_out"),
    ]
    model.graph.node.extend(nodes)
    model.graph.output.append(helper.make_tensor_value_info(
        output, TensorProto.FLOAT, [None, weights.shape[0] * c]))
