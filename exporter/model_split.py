"""Split any Keras CNN (Sequential or Functional) into features -> explained layer -> head.

The Grad-CAM graph needs the activations of one convolutional layer and the
gradient of a class score with respect to them. We therefore cut the model at
that layer: `features(x)` runs everything up to it (a Keras sub-model, also when
the layer sits inside a nested backbone), and `head` is the chain of layers after
it, which we call one by one. Nested transfer-learning models cannot be cut with
`keras.Model(outer.inputs, inner_layer.output)`, so the cut is made inside the
nested model and the outer layers before it are replayed in front.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import keras
import numpy as np

from exporter.errors import ExportError

OutputKind = Literal["softmax", "sigmoid", "logits"]


def _rank(layer: keras.layers.Layer) -> int | None:
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):  # layer never called / multiple outputs
        return None


def _is_model(layer: keras.layers.Layer) -> bool:
    return isinstance(layer, keras.Model)


def _compute_layers(model: keras.Model) -> list[keras.layers.Layer]:
    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


@dataclass
class ModelSplit:
    """features(x) -> activations; head layers map activations to the last layer's input."""

    features: Callable[..., Any]
    head: list[keras.layers.Layer]
    last: keras.layers.Layer | None  # the final Dense whose activation we strip, or None
    output_kind: OutputKind
    layer_name: str
    activation_shape: tuple[int, int, int]
    num_outputs: int  # units of the model's output (1 for a single sigmoid unit)

    @property
    def num_classes(self) -> int:
        return 2 if self.num_outputs == 1 else self.num_outputs


def _find_path(model: keras.Model, name: str) -> list[keras.layers.Layer] | None:
    """Path of nested layers from the top level down to the layer called `name`."""
    for layer in _compute_layers(model):
        if layer.name == name:
            return [layer]
        if _is_model(layer):
            sub = _find_path(layer, name)
            if sub:
                return [layer, *sub]
    return None


def _auto_path(model: keras.Model) -> list[keras.layers.Layer]:
    """The last layer with a 4-D output before the head, descending into backbones."""
    for layer in reversed(_compute_layers(model)):
        if _rank(layer) == 4:
            if _is_model(layer):
                return [layer, *_auto_path(layer)]
            return [layer]
    raise ExportError(
        "the model has no layer with a 4-D output [N,h,w,C]: it is not a CNN that Grad-CAM "
        "can explain (pass --layer to name one if auto-detection missed it)"
    )


def layer_names(model: keras.Model) -> list[str]:
    names: list[str] = []
    for layer in _compute_layers(model):
        names.append(layer.name)
        if _is_model(layer):
            names.extend(layer_names(layer))
    return names


def _output_kind(
    last: keras.layers.Layer, declared: str
) -> tuple[OutputKind, keras.layers.Layer | None]:
    activation = getattr(last, "activation", None)
    act_name = getattr(activation, "__name__", "") if activation is not None else ""
    if isinstance(last, keras.layers.Softmax) or (
        isinstance(last, keras.layers.Activation) and act_name == "softmax"
    ):
        return "softmax", None  # the head's previous layer already yields logits
    if isinstance(last, keras.layers.Dense):
        if act_name in ("softmax", "sigmoid"):
            if declared == "logits":
                raise ExportError(f"--outputs logits, but the last layer applies {act_name}")
            return act_name, last  # type: ignore[return-value]
        if act_name == "linear":
            return "logits", last
        raise ExportError(
            f"the last Dense layer has activation '{act_name}', not softmax/sigmoid/linear"
        )
    if declared == "logits":
        return "logits", None
    raise ExportError(
        f"cannot tell what the last layer '{last.name}' ({type(last).__name__}) outputs: "
        "end the model with a Dense layer, or pass --outputs logits"
    )


def split_model(model: keras.Model, layer: str | None = None, outputs: str = "auto") -> ModelSplit:
    """Cut `model` at the explained layer (auto-detected unless named)."""
    if layer is None:
        path = _auto_path(model)
    else:
        found = _find_path(model, layer)
        if found is None:
            raise ExportError(
                f"no layer named '{layer}' in the model; layers with a 4-D output: "
                + ", ".join(explainable_layers(model))
            )
        path = found
    target = path[-1]
    if _rank(target) != 4:
        raise ExportError(
            f"layer '{target.name}' has output shape {target.output.shape}, not [N,h,w,C]"
        )

    # Features: outer layers before the nested model(s) on the path are replayed in front.
    features_stack: list[Callable[..., Any]] = []
    head: list[keras.layers.Layer] = []
    container = model
    for depth, node in enumerate(path):
        layers = _compute_layers(container)
        idx = layers.index(node)
        if depth == len(path) - 1:
            features_stack.append(keras.Model(container.inputs, node.output, name="features"))
        else:
            features_stack.extend(layers[:idx])
        head = layers[idx + 1 :] + head
        container = node

    def features(x: Any) -> Any:
        for fn in features_stack:
            x = fn(x, training=False)
        return x

    if not head:
        raise ExportError(
            f"layer '{target.name}' is the model's output: there is no head to explain"
        )
    last_layer = head[-1]
    kind, last = _output_kind(last_layer, outputs)
    if kind == "softmax" and last is None:
        head = head[:-1]  # drop the separate Softmax layer: we need the logits
    elif last is not None:
        head = head[:-1]
    num_outputs = int(model.outputs[0].shape[-1])
    if kind == "sigmoid" and num_outputs != 1:
        raise ExportError(
            "multi-label sigmoid outputs are not supported: one sigmoid unit or a softmax"
        )
    shape = tuple(int(d) for d in target.output.shape[1:])
    return ModelSplit(features, head, last, kind, target.name, shape, num_outputs)  # type: ignore[arg-type]


def keras_probabilities(model: keras.Model, x: np.ndarray, kind: OutputKind) -> np.ndarray:
    """The reference: Keras's own prediction, as [N,K] probabilities."""
    y = np.asarray(model.predict(x, verbose=0, batch_size=32), dtype=np.float64)
    if kind == "logits":
        if y.shape[-1] == 1:
            y = np.concatenate([-y / 2, y / 2], axis=-1)
        y = np.exp(y - y.max(axis=1, keepdims=True))
        return y / y.sum(axis=1, keepdims=True)
    if y.shape[-1] == 1:
        return np.concatenate([1 - y, y], axis=-1)
    return y


def explainable_layers(model: keras.Model) -> Sequence[str]:
    return [n for n in layer_names(model) if _rank(_find_path(model, n)[-1]) == 4]  # type: ignore[index]
