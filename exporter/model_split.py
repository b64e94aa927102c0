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


class LayerError(ExportError):
    """The explained layer cannot be used as named (a usage error: the CLI exits with 2)."""


def _output_tensor(layer: keras.layers.Layer) -> Any | None:
    """The layer's single output tensor, or None (never called, or several outputs).

    A nested Functional model's `.output` is its own output structure, which a Keras 3
    model reloaded from `.keras` may give back as a one-element list.
    """
    try:
        out = layer.output
    except (AttributeError, ValueError):  # never called
        return None
    if isinstance(out, (list, tuple)):
        if len(out) != 1:
            return None
        out = out[0]
    return out if hasattr(out, "shape") else None


def _rank(layer: keras.layers.Layer) -> int | None:
    out = _output_tensor(layer)
    return None if out is None else len(out.shape)


def _shape_text(layer: keras.layers.Layer) -> str:
    out = _output_tensor(layer)
    if out is not None:
        return f"output shape {tuple(out.shape)}"
    try:
        n = len(layer.output)
    except (AttributeError, ValueError, TypeError):
        return "no output (it is never called in the model)"
    return f"{n} outputs"


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


def _auto_path(model: keras.Model) -> list[keras.layers.Layer] | None:
    """The last layer with a 4-D output, descending into nested models (backbones).

    A backbone is searched even when its own output is not 4-D (keras.applications
    with `pooling="avg"`): its global pooling then joins the head.
    """
    for layer in reversed(_compute_layers(model)):
        if _is_model(layer):
            inner = _auto_path(layer)
            if inner:
                return [layer, *inner]
        elif _rank(layer) == 4:
            return [layer]
    return None


def _output_producer(nested: keras.Model) -> keras.layers.Layer:
    """The layer inside `nested` that produces its (single) output."""
    outputs = nested.outputs  # a list for Functional and Sequential models alike
    history = getattr(outputs[0], "_keras_history", None) if len(outputs) == 1 else None
    producer = history[0] if history else None
    if producer is None or producer not in _compute_layers(nested):
        raise LayerError(
            f"cannot explain the nested model '{nested.name}' by its output "
            f"({len(outputs)} output(s)); name a layer inside it with --layer"
        )
    return producer


def _descend_to_output(path: list[keras.layers.Layer]) -> list[keras.layers.Layer]:
    """A nested model named as the explained layer means its output: extend the path to
    the layer inside it that produces that output (again for models inside models)."""
    while _is_model(path[-1]):
        nested = path[-1]
        if _rank(nested) != 4:
            inner = _auto_path(nested)
            hint = f"; its last 4-D layer is '{inner[-1].name}'" if inner else ""
            raise LayerError(
                f"layer '{nested.name}' is a nested model with {_shape_text(nested)}, "
                f"not [N,h,w,C] (a pooled backbone?){hint}"
            )
        path = [*path, _output_producer(nested)]
    return path


def _check_chain(
    start: keras.layers.Layer, after: list[keras.layers.Layer], target: keras.layers.Layer
) -> None:
    """The head is replayed layer by layer, so after the cut each layer must take its
    input from the one before: a residual merge or a branch there cannot be replayed."""
    previous = start
    for layer in after:
        nodes = getattr(layer, "_inbound_nodes", None)
        sources = (
            {t._keras_history[0] for t in nodes[0].input_tensors} if nodes else set()
        )
        if sources != {previous}:
            raise LayerError(
                f"cannot explain layer '{target.name}': after it, layer '{layer.name}' does "
                f"not simply take the output of '{previous.name}' (a residual merge or a "
                "branch); explain a layer after the last merge (--layer)"
            )
        previous = layer


def _names_hint(model: keras.Model, limit: int = 8) -> str:
    names = list(explainable_layers(model))
    if len(names) > limit:
        return f"..., {', '.join(names[-limit:])} ({len(names)} in all)"
    return ", ".join(names) or "none"


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
        auto = _auto_path(model)
        if auto is None:
            raise ExportError(
                "the model has no layer with a 4-D output [N,h,w,C]: it is not a CNN that "
                "Grad-CAM can explain (pass --layer to name one if auto-detection missed it)"
            )
        path = auto
    else:
        found = _find_path(model, layer)
        if found is None:
            raise LayerError(
                f"no layer named '{layer}' in the model; layers with a 4-D output: "
                + _names_hint(model)
            )
        path = _descend_to_output(found)
    target = path[-1]
    if _rank(target) != 4:
        raise LayerError(
            f"layer '{target.name}' has {_shape_text(target)}, not [N,h,w,C]; "
            "layers with a 4-D output: " + _names_hint(model)
        )

    # Features: outer layers before the nested model(s) on the path are replayed in front.
    features_stack: list[Callable[..., Any]] = []
    head: list[keras.layers.Layer] = []
    container = model
    for depth, node in enumerate(path):
        layers = _compute_layers(container)
        idx = layers.index(node)
        if depth == len(path) - 1:
            try:
                cut = keras.Model(container.inputs, _output_tensor(node), name="features")
            except ValueError as exc:  # e.g. a layer not connected to the model's input
                raise LayerError(f"cannot cut the model at layer '{node.name}': {exc}") from exc
            features_stack.append(cut)
        else:
            features_stack.extend(layers[:idx])
        _check_chain(node, layers[idx + 1 :], target)
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
    activations = _output_tensor(target)
    assert activations is not None  # its rank was checked above
    shape = tuple(int(d) for d in activations.shape[1:])
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
    """Names --layer accepts (a nested model's name stands for its output)."""
    return [n for n in layer_names(model) if _rank(_find_path(model, n)[-1]) == 4]  # type: ignore[index]
