"""The Keras side of a Keras export: which layer is explained, what the model outputs,
and the TensorFlow reference the parity gate compares the ONNX graphs with.

The Grad-CAM graph itself is built on the converted ONNX graph (exporter/onnx_grad);
here a *tap* marks the explained layer inside the whole model's own forward pass: the
layer's `call` is wrapped while the model is traced (or run eagerly) so that its output
is recorded, or replaced by given activations. Nothing is cut or replayed, so nested
backbones (a Functional model inside a model), models reloaded from `.keras` and pooled
backbones (`pooling="avg"`) all work the same way, and so do residual merges after the
explained layer. The final softmax/sigmoid is switched off the same way, so the traced
model returns the pre-activation scores (the logits Grad-CAM differentiates).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import keras
import numpy as np
import tensorflow as tf

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
class KerasTarget:
    """The explained layer and the model's output layer, resolved on a Keras model."""

    layer: keras.layers.Layer  # whose output is explained (inside a nested model too)
    last: keras.layers.Layer  # the model's output layer (a Dense or a Softmax)
    output_kind: OutputKind
    activation_shape: tuple[int, int, int]
    num_outputs: int  # units of the model's output (1 for a single sigmoid unit)
    path: list[keras.layers.Layer] = field(default_factory=list)  # top level -> layer
    dense: keras.layers.Layer | None = None  # the output Dense (before a Softmax layer)

    @property
    def layer_name(self) -> str:
        return str(self.layer.name)

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
    with `pooling="avg"`): its global pooling then follows the explained layer.
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


def explainable_layers(model: keras.Model) -> Sequence[str]:
    """Names --layer accepts (a nested model's name stands for its output)."""
    return [n for n in layer_names(model) if _rank(_find_path(model, n)[-1]) == 4]  # type: ignore[index]


def _final_layer(model: keras.Model) -> keras.layers.Layer:
    """The layer producing the model's output, inside nested models too."""
    last = _compute_layers(model)[-1] if not model.outputs else _output_producer(model)
    while _is_model(last):
        last = _output_producer(last)
    return last


def _output_kind(last: keras.layers.Layer, declared: str) -> OutputKind:
    activation = getattr(last, "activation", None)
    act_name = getattr(activation, "__name__", "") if activation is not None else ""
    if isinstance(last, keras.layers.Softmax) or (
        isinstance(last, keras.layers.Activation) and act_name == "softmax"
    ):
        return "softmax"  # the previous layer already yields logits
    if isinstance(last, keras.layers.Dense):
        if act_name in ("softmax", "sigmoid"):
            if declared == "logits":
                raise ExportError(f"--outputs logits, but the last layer applies {act_name}")
            return act_name  # type: ignore[return-value]
        if act_name == "linear":
            return "logits"
        raise ExportError(
            f"the last Dense layer has activation '{act_name}', not softmax/sigmoid/linear"
        )
    if declared == "logits":
        return "logits"
    raise ExportError(
        f"cannot tell what the last layer '{last.name}' ({type(last).__name__}) outputs: "
        "end the model with a Dense layer, or pass --outputs logits"
    )


def choose_layer(model: keras.Model, layer: str | None = None,
                 outputs: str = "auto") -> KerasTarget:
    """The explained layer (auto-detected unless named) and what the model outputs."""
    if len(model.outputs) != 1:
        raise ExportError("models with several outputs are not supported")
    if layer is None:
        path = _auto_path(model)
        if path is None:
            raise ExportError(
                "the model has no layer with a 4-D output [N,h,w,C]: it is not a CNN that "
                "Grad-CAM can explain (pass --layer to name one if auto-detection missed it)"
            )
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
    last = _final_layer(model)
    if last is target:
        raise ExportError(
            f"layer '{target.name}' is the model's output: there is no head to explain"
        )
    kind = _output_kind(last, outputs)
    num_outputs = int(model.outputs[0].shape[-1])
    if kind == "sigmoid" and num_outputs != 1:
        raise ExportError(
            "multi-label sigmoid outputs are not supported: one sigmoid unit or a softmax"
        )
    activations = _output_tensor(target)
    assert activations is not None  # its rank was checked above
    shape = tuple(int(d) for d in activations.shape[1:])
    dense = last if isinstance(last, keras.layers.Dense) else _input_producer(last)
    return KerasTarget(target, last, kind, shape, num_outputs, path,  # type: ignore[arg-type]
                       dense if isinstance(dense, keras.layers.Dense) else None)


def _input_producer(layer: keras.layers.Layer) -> keras.layers.Layer | None:
    nodes = getattr(layer, "_inbound_nodes", None)
    tensors = nodes[0].input_tensors if nodes else []
    return tensors[0]._keras_history[0] if len(tensors) == 1 else None


@dataclass
class Tap:
    """What the tapped forward pass recorded (tensors of the last call)."""

    activations: Any = None
    pooled: Any = None  # the output Dense layer's input (the penultimate features)
    calls: int = 0


def _unwrap(x: Any) -> Any:
    return x[0] if isinstance(x, (list, tuple)) and len(x) == 1 else x


@contextlib.contextmanager
def tapped(target: KerasTarget, given: Any = None) -> Iterator[Tap]:
    """While open: calling the model records the explained layer's output (or returns
    `given` in its place) and the model returns its pre-activation scores."""
    tap = Tap()
    layer, last, dense = target.layer, target.last, target.dense
    layer_call, last_call = layer.call, last.call
    dense_call = dense.call if dense is not None and dense is not last else None
    saved_activation = getattr(last, "activation", None)

    def explained_call(*args: Any, **kwargs: Any) -> Any:
        tap.calls += 1
        if tap.calls > 1:
            raise LayerError(f"layer '{layer.name}' is called more than once in the model: "
                             "its output is ambiguous; name another layer with --layer")
        out = layer_call(*args, **kwargs)
        if given is not None:
            out = tf.convert_to_tensor(given, dtype=_unwrap(out).dtype)
        tap.activations = _unwrap(out)
        return out

    def last_call_logits(*args: Any, **kwargs: Any) -> Any:
        if dense is last:
            tap.pooled = _unwrap(args[0])
        if target.output_kind == "softmax" and not isinstance(last, keras.layers.Dense):
            return args[0]  # a separate Softmax layer: its input is the logits
        return last_call(*args, **kwargs)

    def dense_call_recorded(*args: Any, **kwargs: Any) -> Any:
        tap.pooled = _unwrap(args[0])
        return dense_call(*args, **kwargs)  # type: ignore[misc]

    layer.call = explained_call
    last.call = last_call_logits
    if dense_call is not None:
        dense.call = dense_call_recorded  # type: ignore[union-attr]
    if target.output_kind in ("softmax", "sigmoid") and isinstance(last, keras.layers.Dense):
        last.activation = keras.activations.linear
    try:
        yield tap
    finally:
        del layer.call  # back to the class's own method
        for patched in (last, dense):
            if patched is not None and "call" in vars(patched):
                del patched.call
        if saved_activation is not None:
            last.activation = saved_activation


def two_way(scores: tf.Tensor, num_outputs: int) -> tf.Tensor:
    """One sigmoid unit z -> logits [-z/2, z/2]: softmax of that is [1-σ(z), σ(z)]."""
    if num_outputs == 1:
        return tf.matmul(scores, tf.constant([[-0.5, 0.5]], dtype=scores.dtype))
    return scores


def forward(model: keras.Model, target: KerasTarget, x: Any, given: Any = None,
            two_way_scores: bool = True) -> tuple[tf.Tensor, Tap]:
    """(logits [N,K], tap): the model's pre-softmax scores and what the tap recorded;
    a single sigmoid unit's own score [N,1] with `two_way_scores=False`."""
    with tapped(target, given) as tap:
        scores = _unwrap(model(x, training=False))
    return (two_way(scores, target.num_outputs) if two_way_scores else scores), tap


def model_logits(model: keras.Model, x: Any, outputs: str = "auto") -> tf.Tensor:
    """The pre-softmax scores [N,K] of any model the exporter takes."""
    return forward(model, choose_layer(model, None, outputs), x)[0]


# Images per GradientTape run: the tape holds every activation of the model for them
# (ResNet50 at 224 px: ~0.1 GB an image).
TAPE_BATCH = 8


def gradients(model: keras.Model, target: KerasTarget, x: np.ndarray, classes: np.ndarray,
              given: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """TensorFlow's autodiff on the Keras model: d(logit of `classes`, -1 = predicted) /
    d(explained layer's output), with the layer's output replaced by `given` if set."""
    parts = [
        _gradients(model, target, x[i : i + TAPE_BATCH], classes[i : i + TAPE_BATCH],
                   None if given is None else given[i : i + TAPE_BATCH])
        for i in range(0, len(x), TAPE_BATCH)
    ]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _gradients(model: keras.Model, target: KerasTarget, x: np.ndarray, classes: np.ndarray,
               given: np.ndarray | None) -> dict[str, np.ndarray]:
    given_t = None if given is None else tf.constant(given)
    with tf.GradientTape() as tape:
        if given_t is not None:
            tape.watch(given_t)  # a constant: the tape only follows it when told
        with tapped(target, given_t) as tap:
            scores = _unwrap(model(tf.constant(x), training=False))
        logits = two_way(scores, target.num_outputs)
    cls = np.where(classes < 0, np.argmax(logits.numpy(), axis=1), classes).astype(np.int64)
    seed = tf.one_hot(cls, target.num_classes, dtype=logits.dtype)
    grads = tape.gradient(logits, tap.activations, output_gradients=seed)
    if grads is None:
        raise ExportError(f"the class scores do not depend on layer '{target.layer_name}'")
    found = {
        "logits": logits.numpy(),
        "class_index": cls,
        "activations": np.asarray(tap.activations),
        "gradients": grads.numpy(),
    }
    if tap.pooled is not None:
        found["pooled"] = np.asarray(tap.pooled)
    return found


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
