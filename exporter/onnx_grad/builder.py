"""ONNX classifier -> classifier.onnx and gradcam.onnx, the Grad-CAM graph built by
appending a reverse-mode pass to the forward graph, with no training framework.

Both graphs take `image` [N, ...] in the model's own layout with a symbolic batch.
gradcam.onnx adds `target` [N] int64 (-1: the predicted class) and returns
`activations` and `gradients` always as NHWC [N, h, w, C] (transposed inside the
graph when the model computes NCHW), the layout braincam.cam and every consumer read.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from braincam.model_spec import (
    ACTIVATIONS_OUTPUT,
    CLASS_OUTPUT,
    GRADIENTS_OUTPUT,
    IMAGE_INPUT,
    PROBABILITIES_OUTPUT,
    TARGET_INPUT,
)
from braincam.preprocessing import Layout, Preprocessing
from exporter.errors import ExportError
from exporter.onnx_grad import rows
from exporter.onnx_grad.anatomy import Found, GraphAnatomy, analyse, backward_reach, forward_reach
from exporter.onnx_grad.emit import Emitter
from exporter.onnx_grad.graph import Dim, GraphInfo, node_label, opset_of
from exporter.onnx_grad.rows import Rows
from exporter.onnx_grad.rules import NON_DIFFERENTIABLE, RULES
from exporter.onnx_grad.tokens import TokenGrid

MIN_OPSET = 17  # ScatterElements(reduction=add) needs 16; 17 is what both exporters write
CONTRACT_NAMES = (IMAGE_INPUT, TARGET_INPUT, PROBABILITIES_OUTPUT, CLASS_OUTPUT,
                  ACTIVATIONS_OUTPUT, GRADIENTS_OUTPUT)
BATCH = "N"


@dataclass
class BuiltGraphs:
    classifier: onnx.ModelProto
    gradcam: onnx.ModelProto
    anatomy: GraphAnatomy
    found: Found
    activation_shape: list[int]  # [h, w, C]
    num_classes: int
    info: GraphInfo | None = None  # the source's shapes (exporter/budget.py reads them)


def prepare_model(model: onnx.ModelProto, prep: Preprocessing) -> onnx.ModelProto:
    """A copy at opset >= 17, contract names free, the image input sized by `prep`."""
    model = copy.deepcopy(model)
    if opset_of(model) < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as exc:
            raise ExportError(f"could not convert the model from opset {opset_of(model)} to "
                              f"{MIN_OPSET}: {exc}") from exc
    graph = model.graph
    for name in CONTRACT_NAMES:
        _rename(graph, name, f"{name}__source")
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ExportError(f"the model has {len(inputs)} inputs; an image classifier with one "
                          "input is supported")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ExportError(f"the model's input has rank {len(dims)}; a 4-D image batch is expected")
    if inputs[0].type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ExportError("the model's input is not float32")
    for dim, value in zip(dims, [BATCH, *prep.input_shape], strict=True):
        if isinstance(value, str):
            dim.ClearField("dim_value")
            dim.dim_param = value
        else:
            dim.ClearField("dim_param")
            dim.dim_value = value
    for out in graph.output:
        out_dims = out.type.tensor_type.shape.dim
        if out_dims:
            out_dims[0].ClearField("dim_value")
            out_dims[0].dim_param = BATCH
    del graph.value_info[:]  # stale with the new input shape; ORT infers its own
    return model


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
        node.output[:] = [new if o == old else o for o in node.output]
    for value in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]:
        if value.name == old:
            value.name = new


def forward_base(info: GraphInfo, found: Found
                 ) -> tuple[onnx.ModelProto, Emitter, str, str, int]:
    """A copy of the source whose only output is the contract's probabilities, its input
    renamed to the contract's image; the emitter to extend it, and the probabilities,
    the logits and the number of classes (`_class_scores`)."""
    base = copy.deepcopy(info.model)
    del base.graph.value_info[:]
    graph = base.graph
    em = Emitter(graph, info)
    # image -> the model's own input name
    image_value = next(i for i in graph.input if i.name == found.image)
    graph.node.insert(0, helper.make_node("Identity", [IMAGE_INPUT], [found.image],
                                          name="bc_image"))
    image_value.name = IMAGE_INPUT
    probabilities, logits, k = _class_scores(em, info, found)
    graph.node.append(helper.make_node("Identity", [probabilities], [PROBABILITIES_OUTPUT],
                                       name="bc_probabilities"))
    del graph.output[:]
    graph.output.append(
        helper.make_tensor_value_info(PROBABILITIES_OUTPUT, TensorProto.FLOAT, [BATCH, k])
    )
    return base, em, probabilities, logits, k


def build_graphs(
    model: onnx.ModelProto,
    prep: Preprocessing,
    layer: str | None = None,
    outputs: str = "auto",
    layer_layout: Layout | None = None,
) -> BuiltGraphs:
    """`layer_layout`: the layout of the tensor `layer` names, when the caller knows it."""
    source = prepare_model(model, prep)
    info = GraphInfo.of(source)
    found = analyse(info, prep.layout, layer, outputs, layer_layout)
    base, em, probabilities, logits, k = forward_base(info, found)
    graph = base.graph
    classifier = copy.deepcopy(base)
    _prune(classifier.graph)

    # gradcam: target -> class_index -> one-hot seed -> reverse pass
    seed_at, seed = class_seed(em, found, probabilities, logits, k)
    grad = backward(em, info, found.explained, seed_at, seed, found.layers)
    activations = found.explained
    shape = info.shape(found.explained)
    h: Dim
    w: Dim
    if found.tokens is not None:  # [N, T, C] -> the patch tokens on their grid, NHWC
        grid = found.tokens
        h, w, c = grid.height, grid.width, shape[2]
        activations, grad = (_token_grid(em, t, grid, c) for t in (activations, grad))
    else:
        h, w, c = (shape[2], shape[3], shape[1]) if found.explained_layout == "nchw" else shape[1:4]
    to_nhwc = [0, 2, 3, 1] if found.explained_layout == "nchw" else [0, 1, 2, 3]
    graph.node.append(helper.make_node("Transpose", [activations], [ACTIVATIONS_OUTPUT],
                                       perm=to_nhwc, name="bc_activations"))
    graph.node.append(helper.make_node("Transpose", [grad], [GRADIENTS_OUTPUT], perm=to_nhwc,
                                       name="bc_gradients"))
    if h is None or w is None or c is None:
        raise ExportError(f"the explained tensor {found.explained!r} has no static shape: {shape}")
    graph.output.extend([
        helper.make_tensor_value_info(CLASS_OUTPUT, TensorProto.INT64, [BATCH]),
        helper.make_tensor_value_info(ACTIVATIONS_OUTPUT, TensorProto.FLOAT, [BATCH, h, w, c]),
        helper.make_tensor_value_info(GRADIENTS_OUTPUT, TensorProto.FLOAT, [BATCH, h, w, c]),
    ])
    _prune(graph)
    for proto in (classifier, base):
        proto.producer_name = "braincam-exporter"
    anatomy = GraphAnatomy(image=IMAGE_INPUT, explained=found.explained, logits=logits,
                           probabilities=PROBABILITIES_OUTPUT,
                           pooled_features=found.pooled_features)
    return BuiltGraphs(classifier, base, anatomy, found, [h, w, c], k, info)


def class_seed(em: Emitter, found: Found, probabilities: str, logits: str, k: int
               ) -> tuple[str, str]:
    """Input `target` -> output `class_index` (-1: argmax) -> (tensor, its seed): the
    one-hot of the class at the score the backward pass starts from."""
    graph = em.graph
    graph.input.append(helper.make_tensor_value_info(TARGET_INPUT, TensorProto.INT64, [BATCH]))
    # The class is the logits' argmax: softmax rounds near-equal logits (an untrained or
    # a very confident model) to equal probabilities, and a source framework compares
    # its own logits (exporter/parity.py).
    scores = probabilities if found.kind == "probabilities" else logits
    argmax = em.node("ArgMax", [scores], axis=1, keepdims=0)
    negative = em.node("Less", [TARGET_INPUT, em.ints([0])])
    graph.node.append(helper.make_node("Where", [negative, argmax, TARGET_INPUT], [CLASS_OUTPUT],
                                       name="bc_class_index"))
    one_hot = em.node("OneHot", [CLASS_OUTPUT, em.ints([k]), em.const([0.0, 1.0])], axis=-1)
    if found.kind == "probabilities":  # score = log p[class]: d/dp = onehot / p
        return probabilities, em.node("Div", [one_hot, probabilities])
    if found.kind == "sigmoid":  # logits [-z/2, z/2] were appended: seed z directly
        return found.score_tensor, em.node("MatMul", [one_hot,
                                                      em.const(np.array([[-0.5], [0.5]]))])
    return logits, one_hot


def _token_grid(em: Emitter, tokens: str, grid: TokenGrid, channels: Dim) -> str:
    """Tokens [N, T, C] -> their patch tokens as a grid [N, h, w, C]."""
    patches = em.node("Slice", [tokens, em.ints([grid.offset]),
                                em.ints([grid.offset + grid.count]), em.ints([1])])
    return em.node("Reshape", [patches, em.ints([-1, grid.height, grid.width, channels or -1])])


def _class_scores(em: Emitter, info: GraphInfo, found: Found) -> tuple[str, str, int]:
    """(probabilities, logits, K): the contract's K-way softmax and its logits."""
    score_shape = info.shape(found.score_tensor)
    if len(score_shape) != 2 or score_shape[1] is None:
        raise ExportError(f"the model's class scores {found.score_tensor!r} have shape "
                          f"{score_shape}; [N, K] is expected")
    k = int(score_shape[1])
    if found.kind == "sigmoid":  # one unit z -> logits [-z/2, z/2]: softmax = [1-σ(z), σ(z)]
        z = found.score_tensor
        logits = em.node("Concat", [em.node("Mul", [z, em.const(-0.5)]),
                                    em.node("Mul", [z, em.const(0.5)])], "logits", axis=1)
        return em.node("Softmax", [logits], "probabilities", axis=1), logits, 2
    if found.kind in ("softmax", "probabilities"):
        return found.output, found.score_tensor, k
    # logits and log-softmax outputs: the probabilities are the softmax of the logits
    return em.node("Softmax", [found.score_tensor], "probabilities", axis=1), found.score_tensor, k


def backward(em: Emitter, info: GraphInfo, explained: str, seed_at: str, seed: str,
             layers: tuple[str, ...] = ()) -> str:
    """Append d(seed . seed_at)/d(explained) to the graph; returns its tensor name.
    `layers`: the tensors --layer could name, in graph order (for the error's hint)."""
    return backward_to(em, info, [explained], seed_at, seed, layers)[0]


def backward_to(em: Emitter, info: GraphInfo, wanted: list[str], seed_at: str, seed: str,
                layers: tuple[str, ...] = ()) -> list[str]:
    """One reverse pass from `seed_at` down to the earliest of `wanted` (the image, for
    attribution.onnx); returns the gradient of each wanted tensor, in order."""
    active: set[str] = set()
    for name in wanted:
        active |= forward_reach(info, name)
    explained = wanted[0]
    needed = backward_reach(info, seed_at)
    nodes = [
        n for n in info.nodes
        if n.op_type not in NON_DIFFERENTIABLE
        and any(o in active and o in needed for o in n.output)
    ]
    # Every node on the path needs a rule: check them all before emitting anything.
    missing = [n for n in nodes if n.op_type not in RULES or n.domain not in ("", "ai.onnx")]
    if missing:
        node = missing[0]
        raise ExportError(
            f"no backward rule for op {node.op_type!r} (node {node_label(node)!r}) between "
            f"the explained tensor {explained!r} and the class scores; "
            + _layer_hint(info, missing[-1], layers)
        )
    for node in nodes:
        rule = RULES[node.op_type]
        slots = range(len(node.input)) if rule.diff_inputs is None else rule.diff_inputs
        for i, inp in enumerate(node.input):
            if inp in active and i not in slots:
                raise ExportError(f"{node.op_type} node {node_label(node)!r}: its input {i} "
                                  f"({inp!r}) depends on the explained tensor; no rule for that")
    grads: dict[str, list[str | Rows]] = {seed_at: [seed]}
    # The rules edit the forward nodes of the graph being built (MaxPool gains an
    # output there), found by their first output: ONNX names each tensor once.
    live = {n.output[0]: n for n in em.graph.node if n.output}
    for node in reversed(nodes):
        out_grads = [rows.total(em, grads.get(o, [])) for o in node.output]
        if all(g is None for g in out_grads):
            continue
        if out_grads[0] is None:
            raise ExportError(f"{node.op_type} node {node_label(node)!r}: only a secondary "
                              "output is used; no rule for that")
        target = live.get(node.output[0], node)
        in_grads = rows.backward(em, target, out_grads)  # compact rows where they stay so
        if in_grads is None:
            in_grads = list(RULES[node.op_type].fn(
                em, target, [rows.dense(em, g) for g in out_grads]))
        for inp, g in zip(node.input, in_grads, strict=False):
            if g is not None and inp in active:
                grads.setdefault(inp, []).append(g)
    out = []
    for name in wanted:
        total = rows.dense(em, rows.total(em, grads.get(name, [])))
        if total is None:
            raise ExportError(f"the class scores do not depend on {name!r}")
        out.append(total)
    return out


def _layer_hint(info: GraphInfo, last_missing: onnx.NodeProto,
                layers: tuple[str, ...]) -> str:
    """The nearest --layer after every op without a rule, if the model has one."""
    order = {o: i for i, n in enumerate(info.nodes) for o in n.output if o}
    after = [t for t in layers if order.get(t, -1) > order[last_missing.output[0]]]
    if after:
        return (f"the nearest usable --layer after it is {after[0]!r} "
                f"(shape {info.shapes.get(after[0])}), or explain with a gradient-free method "
                "(method=occlusion)")
    return ("no feature map after it can be explained with gradients: explain with a "
            "gradient-free method (method=occlusion)")


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes and initializers the graph's outputs do not need."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            needed.update(_subgraph_inputs(node))
    kept = list(reversed(keep))
    del graph.node[:]
    graph.node.extend(kept)
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    inputs = [i for i in graph.input if i.name in needed or i.name == IMAGE_INPUT]
    del graph.input[:]
    graph.input.extend(inputs)


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names a control-flow node's subgraphs read (If, Loop, Scan)."""
    names: set[str] = set()
    for a in node.attribute:
        for sub in [a.g] if a.HasField("g") else list(a.graphs):
            for inner in sub.node:
                names.update(inner.input)
                names.update(_subgraph_inputs(inner))
    return names
