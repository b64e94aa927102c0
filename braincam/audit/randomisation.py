"""Cascading model-parameter randomisation (Adebayo et al., NeurIPS 2018, "Sanity
Checks for Saliency Maps"), on the ONNX graph itself.

A map that explains the model must change when the model's learned weights are
destroyed. From the top layer down, one layer group at a time, the weights of the
graph are replaced (in memory) by Gaussian noise with each tensor's own std, and
the same images are explained again; each step keeps the layers randomised before
it. Per step, each map is compared with the trained model's by Spearman rank
correlation. A method whose maps keep a high correlation once the model is noise
shows the image, not the model.

What counts as a weight: the float initializers of the nodes on the path from the
image to the class scores: Conv/ConvTranspose/Gemm/MatMul operands, the bias an
Add puts right after one of those, BatchNormalization's and LayerNormalization's
scale and shift (running statistics stay, so no variance goes negative). Structural
constants (shapes, axes, pooling matrices of the out-of-distribution score, the
temperature) are left alone. A layer group is a weight node with the 1-D
parameters that follow it up to the next weight node.

Exporters fold constants: a Grad-CAM graph's backward pass may hold its own copy of
a forward weight, transposed (tf2onnx folds `transpose(W)` of a Dense layer's
gradient into a new initializer). Randomising W alone would leave that copy trained
and the gradient a mix of both models. So every other float initializer holding the
same multiset of values as a weight is treated as a rearranged copy, the element
mapping is read off by sorting, and the copy receives the same random values,
rearranged the same way. ORT runs the edited graphs at optimisation level EXTENDED.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

_WEIGHT_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
_NORM_OPS = {"BatchNormalization": (1, 2), "LayerNormalization": (1, 2),
             "InstanceNormalization": (1, 2)}
_FLOAT = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}


@dataclass
class LayerGroup:
    """The weights randomised together in one step, and their folded copies."""

    name: str
    weights: list[str] = field(default_factory=list)
    copies: dict[str, list[tuple[str, np.ndarray]]] = field(default_factory=dict)


def _ancestors(graph: onnx.GraphProto, outputs: Sequence[str]) -> list[onnx.NodeProto]:
    """The nodes `outputs` depend on, in the graph's (topological) order."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    needed: set[int] = set()
    stack = [producer[o] for o in outputs if o in producer]
    while stack:
        i = stack.pop()
        if i in needed:
            continue
        needed.add(i)
        stack.extend(producer[t] for t in graph.node[i].input if t in producer)
    return [n for i, n in enumerate(graph.node) if i in needed]


# Path components converters add to a weight's name that say nothing about the layer.
_GENERIC = {"Cast", "ReadVariableOp", "convolution", "merged_input", "BiasAdd", "MatMul",
            "kernel", "bias", "weight", "weights", "batchnorm", "Conv2D"}


def _layer_name(node: onnx.NodeProto, weight: str) -> str:
    """A readable name: the weight's path without the converter's generic parts, else
    the tensor the layer's node writes."""
    parts = [p.split(":")[0] for p in weight.split("/") if p]
    kept = [p for p in parts if p.split("__")[0] not in _GENERIC
            and not p.startswith("ReadVariableOp")]
    if len(parts) > 1 and kept:
        return "/".join(kept[:2])
    return node.name or node.output[0]


def layer_groups(model: onnx.ModelProto, score_output: str) -> list[LayerGroup]:
    """Weight groups of the path to `score_output`, top (nearest the output) first."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer if i.data_type in _FLOAT}
    nodes = _ancestors(graph, [score_output])
    groups: list[LayerGroup] = []
    last_weight_output: set[str] = set()
    taken: set[str] = set()
    ends: list[str] = []  # the last tensor of each group: names unnamed weights' layers
    for node in nodes:
        if node.op_type in _WEIGHT_OPS:
            mats = [t for t in node.input[1:] if t in inits and t not in taken]
            mats = [t for t in mats if len(inits[t].dims) >= 1] if mats else []
            if node.op_type == "MatMul":
                mats = [t for t in node.input if t in inits and t not in taken]
            if mats:
                groups.append(LayerGroup(_layer_name(node, mats[0]), mats))
                ends.append(node.output[0])
                taken.update(mats)
                last_weight_output = set(node.output)
            continue
        if not groups:
            continue
        if node.op_type == "Add" and set(node.input) & last_weight_output:
            bias = [t for t in node.input if t in inits and t not in taken]
            groups[-1].weights += bias
            taken.update(bias)
            ends[-1] = node.output[0]
        elif node.op_type in _NORM_OPS:
            params = [node.input[k] for k in _NORM_OPS[node.op_type]
                      if k < len(node.input) and node.input[k] in inits
                      and node.input[k] not in taken]
            groups[-1].weights += params
            taken.update(params)
        if set(node.input) & last_weight_output:
            last_weight_output = set(node.output)  # BN/ReLU after a conv: still its layer
    for group, end in zip(groups, ends, strict=True):
        if group.name == "" or group.name.startswith(("MatMul", "Gemm", "Conv")):
            group.name = end
    _find_copies(inits, groups, taken)
    return groups[::-1]


def _find_copies(inits: dict[str, onnx.TensorProto], groups: list[LayerGroup],
                 taken: set[str]) -> None:
    """Record, for each weight, the other initializers that hold its values rearranged,
    with the index map `copy.ravel() == weight.ravel()[index]`."""
    others = {name: numpy_helper.to_array(t) for name, t in inits.items() if name not in taken}
    by_size: dict[int, list[str]] = {}
    for name, arr in others.items():
        if arr.size > 1:
            by_size.setdefault(arr.size, []).append(name)
    for group in groups:
        for w in group.weights:
            arr = numpy_helper.to_array(inits[w])
            if arr.size <= 1:
                continue
            flat = arr.ravel()
            order_w = np.argsort(flat, kind="stable")
            sorted_w = flat[order_w]
            for name in by_size.get(arr.size, []):
                other = others[name].ravel()
                order_o = np.argsort(other, kind="stable")
                if not np.array_equal(other[order_o], sorted_w):
                    continue
                index = np.empty(arr.size, dtype=np.int64)
                index[order_o] = order_w
                group.copies.setdefault(w, []).append((name, index))


def cascade(
    model: onnx.ModelProto, groups: Sequence[LayerGroup], seed: int = 0
) -> Iterator[tuple[LayerGroup, onnx.ModelProto]]:
    """Yield (group, model with this group and all before it randomised), top first.

    One model object is edited in place step by step: serialise or use each one
    before asking for the next.
    """
    rng = np.random.default_rng(seed)
    inits = {i.name: i for i in model.graph.initializer}
    for group in groups:
        for w in group.weights:
            arr = numpy_helper.to_array(inits[w])
            std = float(arr.std()) if arr.size > 1 else float(abs(arr).max(initial=0.0))
            noise = (rng.standard_normal(arr.shape) * std).astype(arr.dtype)
            inits[w].CopyFrom(numpy_helper.from_array(noise, w))
            for name, index in group.copies.get(w, []):
                shape = numpy_helper.to_array(inits[name]).shape
                copy = noise.ravel()[index].reshape(shape)
                inits[name].CopyFrom(numpy_helper.from_array(copy, name))
        yield group, model


def session_of(model: onnx.ModelProto, providers: Sequence[str]) -> object:
    """An ORT session of an in-memory model, at graph optimisation level EXTENDED."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return ort.InferenceSession(model.SerializeToString(), options, providers=list(providers))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of two maps; NaN when either is constant (e.g. all zero)."""
    from scipy.stats import spearmanr

    x, y = np.ravel(a), np.ravel(b)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


MapsOf = Callable[[object], dict[str, np.ndarray]]  # session -> {method: maps [N,h,w]}


def randomisation_test(
    model: onnx.ModelProto,
    score_output: str,
    maps_of: MapsOf,
    original: dict[str, np.ndarray],
    providers: Sequence[str],
    seed: int = 0,
    on_step: Callable[[], None] | None = None,
) -> dict[str, list[dict[str, object]]]:
    """{method: [{"step", "layer", "spearman", "spearman_per_image"}, ...]}, top layer
    first. `maps_of(session)` explains the audit's images with a session of the edited
    graph; `original` are the trained model's maps of the same images."""
    groups = layer_groups(model, score_output)
    result: dict[str, list[dict[str, object]]] = {m: [] for m in original}
    for step, (group, edited) in enumerate(cascade(model, groups, seed), start=1):
        maps = maps_of(session_of(edited, providers))
        for method, before in original.items():
            rhos = [spearman(p, q) for p, q in zip(before, maps[method], strict=True)]
            defined = [r for r in rhos if not np.isnan(r)]
            result[method].append({
                "step": step,
                "layer": group.name,
                "weights": list(group.weights),
                "folded_copies": sorted(n for c in group.copies.values() for n, _ in c),
                "spearman": float(np.mean(defined)) if defined else None,
                "spearman_per_image": [None if np.isnan(r) else r for r in rhos],
            })
        if on_step is not None:
            on_step()
    return result
