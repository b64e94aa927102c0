"""Where things are in a classifier's ONNX graph: image, explained feature map, logits.

The explained tensor defaults to the last 4-D feature map with more than one position
that *every* path from the image to the logits passes through (a graph cut: inside a
residual block no single tensor is): the last convolutional block's output after its
activation, or after its max pooling where one follows (VGG's `features[-1]`, the layer
pytorch-grad-cam's examples and the Keras exporter's default pick). Paths count only
differentiable edges, so a Shape of the image that feeds a Reshape does not make every
later tensor a non-cut.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import onnx

from exporter.errors import ExportError
from exporter.onnx_grad.graph import GraphInfo, attr_int, attr_ints, node_label
from exporter.onnx_grad.rules import NON_DIFFERENTIABLE, RULES
from exporter.onnx_grad.tokens import TokenGrid, attention_input, last_attention, token_grid

Layout = Literal["nchw", "nhwc"]
OutputKind = Literal["logits", "softmax", "log_softmax", "sigmoid", "probabilities"]

_NCHW_OPS = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
                       "Conv", "ConvTranspose", "BatchNormalization", "InstanceNormalization"})
_PASS_LAYOUT = frozenset(
    {"Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Clip", "Identity", "Dropout",
     "Cast", "Tanh", "Elu", "Selu", "Softplus", "Erf", "Neg", "Exp", "Add", "Sub", "Mul", "Div",
     "Max", "Min", "Pow", "Pad", "Slice", "Concat", "PRelu", "Gelu", "Mish", "Sqrt",
     "LayerNormalization"}
)
_TO_NHWC, _TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


@dataclass(frozen=True)
class GraphAnatomy:
    """Tensor names in the exported graphs that later graph edits need.

    `pooled_features` is the penultimate feature vector [N, D] (the input of the last
    linear layer), None when the head has no such layer.
    """

    image: str
    explained: str
    logits: str
    probabilities: str
    pooled_features: str | None


@dataclass(frozen=True)
class Found:
    """What the analysis finds in the source graph."""

    image: str
    output: str
    kind: OutputKind
    score_tensor: str  # what the backward pass is seeded at (logits, or probabilities)
    explained: str
    explained_layout: Layout  # of the grid the graphs output (tokens: NHWC)
    pooled_features: str | None
    tokens: TokenGrid | None = None  # the explained tensor is a transformer's tokens
    layers: tuple[str, ...] = ()  # the 4-D feature maps --layer could name, in order


def differentiable_inputs(node: onnx.NodeProto) -> list[str]:
    if node.op_type in NON_DIFFERENTIABLE:
        return []
    rule = RULES.get(node.op_type)
    slots = range(len(node.input)) if rule is None or rule.diff_inputs is None else rule.diff_inputs
    return [node.input[i] for i in slots if i < len(node.input) and node.input[i]]


def forward_reach(info: GraphInfo, start: str) -> set[str]:
    """Tensors that depend differentiably on `start`."""
    reached = {start}
    for node in info.nodes:
        if any(i in reached for i in differentiable_inputs(node)) and (
            node.op_type not in NON_DIFFERENTIABLE
        ):
            reached.update(o for o in node.output if o)
    return reached


def backward_reach(info: GraphInfo, target: str) -> set[str]:
    """Tensors `target` depends on differentiably."""
    reached = {target}
    for node in reversed(info.nodes):
        if any(o in reached for o in node.output):
            reached.update(differentiable_inputs(node))
    return reached


def _layouts(info: GraphInfo, image: str, image_layout: Layout) -> dict[str, Layout]:
    """Which 4-D tensors are NCHW or NHWC: propagated forward from the ops that fix it
    (Conv, pooling, Transpose of a known layout), then backward from the ops that read
    it (a pooling's input, a Transpose into NCHW, a mean over axes 1-2): Swin's and
    ConvNeXt's NHWC blocks are known by the permute that feeds their pooling."""
    layouts: dict[str, Layout] = {image: image_layout}
    for node in info.nodes:
        out = node.output[0] if node.output else ""
        if not out or len(info.shapes.get(out, [])) != 4:
            continue
        if node.op_type in _NCHW_OPS:
            layouts[out] = "nchw"
        elif node.op_type == "Transpose":
            src = layouts.get(node.input[0])
            perm = attr_ints(node, "perm")
            if src == "nchw" and perm == _TO_NHWC:
                layouts[out] = "nhwc"
            elif src == "nhwc" and perm == _TO_NCHW:
                layouts[out] = "nchw"
            elif src and perm == [0, 1, 2, 3]:
                layouts[out] = src
        elif node.op_type in _PASS_LAYOUT:
            for inp in node.input:
                if inp in layouts and info.shapes.get(inp) == info.shapes.get(out):
                    layouts[out] = layouts[inp]
                    break
    for node in reversed(info.nodes):
        x = node.input[0] if node.input else ""
        out_layout = layouts.get(node.output[0]) if node.output else None
        if node.op_type in _PASS_LAYOUT and out_layout is not None:
            for inp in node.input:
                if info.shapes.get(inp) == info.shapes.get(node.output[0]):
                    layouts.setdefault(inp, out_layout)
        if not x or x in layouts or len(info.shapes.get(x, [])) != 4:
            continue
        if node.op_type in _NCHW_OPS:
            layouts[x] = "nchw"
        elif node.op_type == "Transpose" and out_layout is not None:
            perm = attr_ints(node, "perm")
            if (perm, out_layout) in ((_TO_NCHW, "nchw"), (_TO_NHWC, "nhwc")):
                layouts[x] = "nhwc" if out_layout == "nchw" else "nchw"
        elif node.op_type in ("ReduceMean", "ReduceMax", "ReduceSum"):
            axes = _reduce_axes_of(info, node)
            if axes == [1, 2]:
                layouts[x] = "nhwc"
            elif axes == [2, 3]:
                layouts[x] = "nchw"
    return layouts


def _reduce_axes_of(info: GraphInfo, node: onnx.NodeProto) -> list[int] | None:
    axes = attr_ints(node, "axes")
    if not axes and len(node.input) > 1 and node.input[1] in info.constants:
        axes = [int(a) for a in info.constants[node.input[1]].reshape(-1)]
    rank = info.rank(node.input[0])
    return sorted(a % rank for a in axes) if axes else None


def _cut_tensors(info: GraphInfo, image: str, target: str) -> list[str]:
    """Tensors every differentiable path from image to target passes through, in order.

    Walking the nodes in topological order, a tensor is a cut exactly when, right
    after it is produced, it is the only relevant tensor still awaiting a consumer.
    """
    relevant = forward_reach(info, image) & backward_reach(info, target)
    pending: dict[str, int] = {}
    for node in info.nodes:
        for inp in set(differentiable_inputs(node)) & relevant:
            pending[inp] = pending.get(inp, 0) + 1
    live: set[str] = set()
    cuts = []
    if image in relevant:
        live.add(image)
    for node in info.nodes:
        ins = set(differentiable_inputs(node)) & relevant
        if not ins:
            continue
        for inp in ins:
            pending[inp] -= 1
            if pending[inp] == 0:
                live.discard(inp)
        for out in node.output:
            if out in relevant:
                live.add(out)
        if len(live) == 1:
            cuts.append(next(iter(live)))
    return cuts


def find_output(info: GraphInfo, outputs: str) -> tuple[str, OutputKind, str]:
    """The model's output, what it is, and the tensor the score is read from."""
    graph = info.model.graph
    if len(graph.output) != 1:
        names = ", ".join(o.name for o in graph.output)
        raise ExportError(f"the model has {len(graph.output)} outputs ({names}); one is supported")
    output = graph.output[0].name
    source = output
    while source in info.producer and info.producer[source].op_type == "Identity":
        source = info.producer[source].input[0]
    node = info.producer.get(source)
    if outputs == "logits" or node is None:
        return output, "logits", output
    rank = info.rank(source)
    if node.op_type in ("Softmax", "LogSoftmax"):
        axis = attr_int(node, "axis", -1 if info.opset >= 13 else 1) % rank
        if rank != 2 or axis != 1:
            raise ExportError(f"{node.op_type} over axis {axis} of a rank-{rank} tensor: "
                              "expected class scores [N, K]")
        kind: OutputKind = "softmax" if node.op_type == "Softmax" else "log_softmax"
        return output, kind, node.input[0]
    if node.op_type == "Sigmoid":
        if info.shape(source)[-1] != 1:
            raise ExportError("multi-label sigmoid outputs are not supported: one sigmoid unit "
                              "or a softmax")
        return output, "sigmoid", node.input[0]
    if outputs == "probabilities":
        return output, "probabilities", output
    return output, "logits", output


def find_pooled_features(info: GraphInfo, score: str) -> str | None:
    """The data input of the last Gemm/MatMul before the score (a bias Add skipped)."""
    node = info.producer.get(score)
    while node is not None and node.op_type in ("Add", "Identity"):
        data = [i for i in node.input if i not in info.constants]
        node = info.producer.get(data[0]) if len(data) == 1 else None
    if node is None or node.op_type not in ("Gemm", "MatMul"):
        return None
    data = [i for i in node.input[:2] if i not in info.constants]
    return data[0] if len(data) == 1 else None


def analyse(
    info: GraphInfo, image_layout: Layout, layer: str | None = None, outputs: str = "auto",
    layer_layout: Layout | None = None,
) -> Found:
    """`layer_layout`: the named tensor's layout when the caller knows it (the Keras path:
    tf2onnx keeps a layer's NHWC output where no convolution or pooling shows it)."""
    graph = info.model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ExportError(f"the model has {len(inputs)} inputs ({', '.join(inputs)}); "
                          "an image classifier with one input is supported")
    image = inputs[0]
    output, kind, score = find_output(info, outputs)
    layouts = _layouts(info, image, image_layout)
    maps = _feature_maps(info, image, score, layouts)
    relevant = forward_reach(info, image) & backward_reach(info, score)
    tokens: TokenGrid | None = None
    if layer is None:
        explained = _transformer_tokens(info, maps, relevant, layouts)
        if explained is None:
            if not maps:
                raise ExportError("found no 4-D feature map that every path from the image to "
                                  "the logits passes through: name one with --layer TENSOR")
            explained = maps[-1]
    else:
        explained = _named_tensor(info, layer, image, score)
    if len(info.shapes.get(explained, [])) == 3:  # a transformer's tokens [N, T, C]
        tokens = token_grid(info, explained, _patches_before(info, explained, maps, layouts),
                            relevant, forward_reach)
    layout = "nhwc" if tokens is not None else layouts.get(explained)
    if layer is not None and layer_layout is not None and tokens is None:
        layout = layer_layout
    if layout is None:
        raise ExportError(f"cannot tell whether tensor {explained!r} is NCHW or NHWC: it is not "
                          "produced from a convolution or pooling by layout-preserving ops")
    return Found(image=image, output=output, kind=kind, score_tensor=score, explained=explained,
                 explained_layout=layout, pooled_features=find_pooled_features(info, score),
                 tokens=tokens, layers=tuple(maps))


def _order(info: GraphInfo) -> dict[str, int]:
    return {o: i for i, n in enumerate(info.nodes) for o in n.output if o}


def _transformer_tokens(info: GraphInfo, maps: list[str], relevant: set[str],
                        layouts: dict[str, Layout]) -> str | None:
    """The last attention's input tokens, if an attention comes after the last feature
    map (ViT, DeiT; Swin's last stage is itself a map and is explained as one)."""
    scores = last_attention(info, relevant, differentiable_inputs)
    if scores is None:
        return None
    order = _order(info)
    if maps and order[maps[-1]] > order[scores.output[0]]:
        return None
    width = None
    if maps:  # the patch embedding's channels
        shape = info.shapes[maps[-1]]
        width = shape[1] if layouts[maps[-1]] == "nchw" else shape[3]
    return attention_input(info, scores, relevant, backward_reach, width)


def _patches_before(info: GraphInfo, tokens: str, maps: list[str],
                    layouts: dict[str, Layout]) -> tuple[str, int, int] | None:
    """The last feature map before the tokens (the patch embedding's) and its grid."""
    order = _order(info)
    before = [m for m in maps if order[m] < order.get(tokens, -1)]
    if not before:
        return None
    h, w = _spatial(info, before[-1], layouts[before[-1]])
    assert h is not None and w is not None
    return before[-1], int(h), int(w)


def _spatial(info: GraphInfo, name: str, layout: Layout) -> list[int | None]:
    shape = info.shapes.get(name, [])
    return list(shape[2:4]) if layout == "nchw" else list(shape[1:3])


def _feature_maps(
    info: GraphInfo, image: str, score: str, layouts: dict[str, Layout]
) -> list[str]:
    """The 4-D feature maps of known layout, more than one position, that are cuts."""
    candidates = []
    for name in _cut_tensors(info, image, score):
        layout = layouts.get(name)
        node = info.producer.get(name)
        if name == image or layout is None or node is None:
            continue
        h, w = _spatial(info, name, layout)
        if h is not None and w is not None and h * w > 1:
            candidates.append(name)
    return candidates


def _named_tensor(info: GraphInfo, layer: str, image: str, score: str) -> str:
    name = layer
    if name not in info.shapes:  # a node name means its first output
        by_node = {n.name: n for n in info.nodes if n.name}
        if layer in by_node:
            name = by_node[layer].output[0]
        else:
            raise ExportError(f"--layer {layer!r} names no tensor or node of the model")
    if len(info.shapes.get(name, [])) not in (3, 4):
        raise ExportError(f"--layer {layer!r}: tensor {name!r} has shape "
                          f"{info.shapes.get(name)}, not a 4-D feature map or a transformer's "
                          "tokens [N, T, C]")
    if name not in forward_reach(info, image) or name not in backward_reach(info, score):
        node = info.producer.get(name)
        where = f" (node {node_label(node)!r})" if node is not None else ""
        raise ExportError(f"--layer {layer!r}: tensor {name!r}{where} is not on a "
                          "differentiable path from the image to the class scores")
    return name
