"""attribution.onnx: activations and gradients at several layers and the gradient with
respect to the image, from one forward + backward run.

A graph of its own beside gradcam.onnx: adding these outputs to gradcam.onnx made the
default Grad-CAM run 2.6x costlier (the reverse pass then runs through the whole
backbone). Same inputs as gradcam.onnx (`image`, `target`); outputs `probabilities`,
`class_index`, `activations_<i>` / `gradients_<i>` [N, h, w, C] (NHWC) per layer and
`image_gradients` in the model's input layout. The reverse pass is the builder's, run
on down to the image.

Default layers: the last map of each of the last stages, a stage ending where the next
map is spatially smaller (the input of each downsampling, its activation rather than a
layout-only copy of it), plus the last feature map unless it is a pooling of the one
before: block 2-4's ReLUs on the demo CNN, layer2-4 on a ResNet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

from braincam.model_spec import CLASS_OUTPUT
from braincam.preprocessing import Preprocessing
from exporter.errors import ExportError
from exporter.onnx_grad.anatomy import Found, Layout, _layouts, _spatial, analyse
from exporter.onnx_grad.builder import (
    BATCH,
    _prune,
    backward_to,
    class_seed,
    forward_base,
    prepare_model,
)
from exporter.onnx_grad.graph import GraphInfo

IMAGE_GRADIENTS_OUTPUT = "image_gradients"
DEFAULT_STAGES = 3
_LAYOUT_ONLY = frozenset({"Transpose", "Identity", "Reshape"})
_POOLS = frozenset({"MaxPool", "AveragePool"})


def activations_output(i: int) -> str:
    return f"activations_{i}"


def gradients_output(i: int) -> str:
    return f"gradients_{i}"


@dataclass(frozen=True)
class Layer:
    name: str  # what a request names (`layer=`): short, unique in the model
    tensor: str  # the source graph's tensor
    layout: Layout
    shape: list[int]  # [h, w, C]


@dataclass
class BuiltAttribution:
    graph: onnx.ModelProto
    source: onnx.ModelProto  # the prepared source model (the gate reads it)
    found: Found
    layers: list[Layer]
    candidates: list[Layer]  # every map --layers could name


def _parts(tensor: str) -> list[str]:
    """A tensor name's path components without the op's own: 'features_1/block3_relu_1/
    Relu:0' -> ['features_1', 'block3_relu_1']; '/layer3/relu_1/Relu_output_0' ->
    ['layer3', 'relu_1']."""
    parts = [p for p in tensor.split("/") if p]
    if len(parts) < 2:  # no path: the name as it is ('Conv__46:0' -> 'Conv__46')
        return [re.sub(r":\d+$", "", tensor) or tensor]
    if re.match(r"^[A-Z]\w*?(_output_\d+)?(:\d+)?$", parts[-1]):
        parts = parts[:-1]
    return [re.sub(r"_\d+$", "", re.sub(r":\d+$", "", p)) or p for p in parts] or [tensor]


def _unique_names(tensors: list[str]) -> list[str]:
    """Short layer names (`tensors` in graph order): the last path component
    ('block3_relu') where unique among the model's maps, else the first ('layer3') for
    the last map under it (the module's output), else the tensor's own name."""
    parts = [_parts(t) for t in tensors]
    out = []
    for i, (tensor, p) in enumerate(zip(tensors, parts, strict=True)):
        last_under = all(q[0] != p[0] for q in parts[i + 1:])  # the module's output
        if sum(q[-1] == p[-1] for q in parts) == 1 and (len(p) > 1 or last_under):
            out.append(p[-1])
        elif last_under and p[0] not in out:
            out.append(p[0])
        else:
            out.append(tensor)
    return out


def _through_layout_ops(info: GraphInfo, name: str, maps: set[str]) -> str:
    """The tensor a chain of Transpose/Identity/Reshape copies ends at (a map too)."""
    while True:
        node = info.producer.get(name)
        if node is None or node.op_type not in _LAYOUT_ONLY or node.input[0] not in maps:
            return name
        name = node.input[0]


def stage_ends(info: GraphInfo, found: Found, layouts: dict[str, Layout]) -> list[str]:
    """The last map of each stage, in graph order (see the module's docstring)."""
    maps = list(found.layers)
    known = set(maps)
    sizes = [tuple(_spatial(info, m, layouts[m])) for m in maps]
    ends: list[str] = []
    for i, (name, size) in enumerate(zip(maps, sizes, strict=True)):
        last = i == len(maps) - 1
        if last:
            node = info.producer.get(name)
            if node is not None and node.op_type in _POOLS:
                continue  # a pooling of the stage before: no new layer
        elif sizes[i + 1] == size:
            continue
        end = _through_layout_ops(info, name, known)
        if end not in ends:
            ends.append(end)
    return ends


def _layer(info: GraphInfo, tensor: str, name: str, layout: Layout) -> Layer:
    shape = info.shape(tensor)
    h, w, c = (shape[2], shape[3], shape[1]) if layout == "nchw" else shape[1:4]
    if h is None or w is None or c is None:
        raise ExportError(f"layer {name!r} ({tensor!r}) has no static shape: {shape}")
    return Layer(name, tensor, layout, [int(h), int(w), int(c)])


def resolve_layers(info: GraphInfo, found: Found, layouts: dict[str, Layout],
                   wanted: list[str] | None, stages: int = DEFAULT_STAGES
                   ) -> tuple[list[Layer], list[Layer]]:
    """(chosen layers, every candidate). `wanted`: short names, tensor names or node
    names of the model's feature maps; None: the last `stages` stage ends."""
    maps = list(found.layers)
    names = _unique_names(maps)
    candidates = [_layer(info, t, n, layouts[t]) for t, n in zip(maps, names, strict=True)]
    by_key: dict[str, Layer] = {}
    for layer in candidates:
        by_key.setdefault(layer.tensor, layer)
        by_key.setdefault(layer.name, layer)
        node = info.producer.get(layer.tensor)
        if node is not None and node.name:
            by_key.setdefault(node.name, layer)
    if wanted is None:
        ends = stage_ends(info, found, layouts)[-stages:]
        return [by_key[t] for t in ends], candidates
    chosen = []
    for key in wanted:
        if key not in by_key:
            raise ExportError(f"--layers {key!r} names no feature map that every path from the "
                              f"image to the class scores passes through; the model's maps: "
                              + ", ".join(f"{c.name} {c.shape}" for c in candidates))
        if by_key[key] not in chosen:
            chosen.append(by_key[key])
    if not chosen:
        raise ExportError("--layers names no layer")
    return chosen, candidates


def build_attribution(model: onnx.ModelProto, prep: Preprocessing,
                      layers: list[str] | None = None, outputs: str = "auto",
                      stages: int = DEFAULT_STAGES) -> BuiltAttribution:
    source = prepare_model(model, prep)
    info = GraphInfo.of(source)
    found = analyse(info, prep.layout, None, outputs)
    if found.tokens is not None:
        raise ExportError("attribution.onnx holds convolutional feature maps; this model is "
                          "explained on a transformer's tokens")
    layouts = _layouts(info, found.image, prep.layout)
    chosen, candidates = resolve_layers(info, found, layouts, layers, stages)

    base, em, probabilities, logits, k = forward_base(info, found)
    graph = base.graph
    seed_at, seed = class_seed(em, found, probabilities, logits, k)
    grads = backward_to(em, info, [*(layer.tensor for layer in chosen), found.image],
                        seed_at, seed, found.layers)
    graph.output.append(helper.make_tensor_value_info(CLASS_OUTPUT, TensorProto.INT64, [BATCH]))
    for i, (layer, grad) in enumerate(zip(chosen, grads, strict=False)):
        to_nhwc = [0, 2, 3, 1] if layer.layout == "nchw" else [0, 1, 2, 3]
        for tensor, out in ((layer.tensor, activations_output(i)), (grad, gradients_output(i))):
            graph.node.append(helper.make_node("Transpose", [tensor], [out], perm=to_nhwc,
                                               name=f"bc_{out}"))
            graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT,
                                                              [BATCH, *layer.shape]))
    graph.node.append(helper.make_node("Identity", [grads[-1]], [IMAGE_GRADIENTS_OUTPUT],
                                       name="bc_image_gradients"))
    graph.output.append(helper.make_tensor_value_info(
        IMAGE_GRADIENTS_OUTPUT, TensorProto.FLOAT, [BATCH, *prep.input_shape]))
    _prune(graph)
    base.producer_name = "braincam-exporter"
    return BuiltAttribution(base, source, found, chosen, candidates)
