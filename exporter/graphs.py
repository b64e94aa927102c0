"""The two TensorFlow functions that become classifier.onnx and gradcam.onnx."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from braincam.model_spec import (
    ACTIVATIONS_OUTPUT,
    CLASS_OUTPUT,
    GRADIENTS_OUTPUT,
    IMAGE_INPUT,
    PROBABILITIES_OUTPUT,
    TARGET_INPUT,
)
from exporter.backward import Backward, rule_for
from exporter.model_split import ModelSplit

# Internal tensors both graphs expose to the trust edits (exporter/ood_graph.py): the
# penultimate features (the head's first vector, after global pooling), the explained
# layer's activations averaged over a GRID x GRID grid, and the pre-softmax scores.
# They are graph outputs only until those edits consume them.
FEATURES_TENSOR = "features"
GRID_FEATURES_TENSOR = "grid_features"
LOGITS_TENSOR = "logits"
GRID = 2


def grid_pool(acts: tf.Tensor, grid: int = GRID) -> tf.Tensor:
    """[N,h,w,C] -> [N, g·g·C]: the mean of each cell of a g x g grid (rows first).

    Global pooling forgets where things are, so a rotated or cropped scan keeps the
    statistics of a normal one; a coarse grid keeps the layout (trainer.ood_eval
    measures the difference). Rows and columns beyond a multiple of g are left out.
    One MatMul with a constant [g·g, h·w] averaging matrix: in ONNX Runtime a third
    of the time of a ReduceMean over a 6-D reshape.
    """
    h, w, c = (int(d) for d in acts.shape[1:])
    g = max(1, min(grid, h, w))
    bh, bw = h // g, w // g
    weights = np.zeros((g * g, h * w), np.float32)
    for cell in range(g * g):
        r, q = divmod(cell, g)
        mask = np.zeros((h, w), np.float32)
        mask[r * bh : (r + 1) * bh, q * bw : (q + 1) * bw] = 1.0 / (bh * bw)
        weights[cell] = mask.reshape(-1)
    flat = tf.reshape(acts, [-1, h * w, c])
    return tf.reshape(tf.matmul(tf.constant(weights), flat), [-1, g * g * c])


def _logits(split: ModelSplit, y: tf.Tensor) -> tf.Tensor:
    """The pre-softmax scores [N,K] of the head's output (the last layer linearised)."""
    last = split.last
    if last is not None:
        y = tf.matmul(y, tf.convert_to_tensor(last.kernel))
        if last.use_bias:
            y = tf.nn.bias_add(y, tf.convert_to_tensor(last.bias))
    if split.num_outputs == 1:
        # One sigmoid unit z -> logits [-z/2, z/2]: softmax of that is [1-σ(z), σ(z)],
        # and each class gets a meaningful gradient. A MatMul, not a Concat: its
        # gradient exports cleanly.
        y = tf.matmul(y, tf.constant([[-0.5, 0.5]], dtype=y.dtype))
    return y


def _spatial_prefix(split: ModelSplit) -> list[tuple[keras.layers.Layer, Backward]]:
    """Leading head layers whose gradient we write by hand (pooling, flatten, ...)."""
    prefix = []
    for layer in split.head:
        rule = rule_for(layer)
        if rule is None:
            break
        prefix.append((layer, rule))
        if len(layer.output.shape) != 4:
            break  # reached the head's first vector: Dense layers follow
    return prefix


def forward(split: ModelSplit, x: tf.Tensor) -> dict[str, tf.Tensor]:
    """The trust tensors: penultimate features [N,D] (the head's first vector), grid
    features of the explained layer, logits [N,K]."""
    y = acts = split.features(x)
    features = None
    for layer in split.head:
        y = layer(y, training=False)
        if features is None and len(y.shape) == 2:
            features = y
    return {
        FEATURES_TENSOR: y if features is None else features,
        GRID_FEATURES_TENSOR: grid_pool(acts),
        LOGITS_TENSOR: _logits(split, y),
    }


def forward_logits(split: ModelSplit, x: tf.Tensor) -> tf.Tensor:
    return forward(split, x)[LOGITS_TENSOR]


def gradcam_outputs(
    split: ModelSplit, x: tf.Tensor, target: tf.Tensor, hand_written: bool = True
) -> dict[str, tf.Tensor]:
    """Forward once, then the gradient of the chosen class's pre-softmax score.

    With `hand_written=False` every gradient comes from TensorFlow's autodiff: the
    reference the parity gate compares the exported graph against.
    """
    return head_gradients(split, split.features(x), target, hand_written)


def head_gradients(
    split: ModelSplit, acts: tf.Tensor, target: tf.Tensor, hand_written: bool = True
) -> dict[str, tf.Tensor]:
    """Probabilities, explained class and d(score)/d(acts), starting from the activations."""
    prefix = _spatial_prefix(split) if hand_written else []
    inputs = []
    z = acts
    for layer, _ in prefix:
        inputs.append(z)
        z = layer(z, training=False)
    rest = split.head[len(prefix) :]
    features = z if len(z.shape) == 2 else None
    with tf.GradientTape() as tape:
        tape.watch(z)
        y = z
        for layer in rest:
            y = layer(y, training=False)
            if features is None and len(y.shape) == 2:
                features = y
        logits = _logits(split, y)
    k = split.num_classes
    cls = tf.where(target < 0, tf.argmax(logits, axis=1, output_type=tf.int64), target)
    # output_gradients selects the class: slicing logits[:, i] would need
    # StridedSliceGrad, which does not export.
    grad = tape.gradient(logits, z, output_gradients=tf.one_hot(cls, k, dtype=logits.dtype))
    for (layer, rule), layer_input in zip(reversed(prefix), reversed(inputs), strict=True):
        grad = rule(layer, layer_input, grad)
    return {
        PROBABILITIES_OUTPUT: tf.nn.softmax(logits, axis=-1),
        CLASS_OUTPUT: cls,
        ACTIVATIONS_OUTPUT: acts,
        GRADIENTS_OUTPUT: grad,
        FEATURES_TENSOR: y if features is None else features,
        GRID_FEATURES_TENSOR: grid_pool(acts),
        LOGITS_TENSOR: logits,
    }


def _signature(split_shape: tuple[int, int, int], with_target: bool) -> list[tf.TensorSpec]:
    sig = [tf.TensorSpec([None, *split_shape], tf.float32, name=IMAGE_INPUT)]
    if with_target:
        sig.append(tf.TensorSpec([None], tf.int64, name=TARGET_INPUT))
    return sig


def build_functions(
    split: ModelSplit, input_shape: tuple[int, int, int]
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """tf.functions with explicit signatures (dynamic batch) for both graphs."""

    @tf.function(input_signature=_signature(input_shape, False), autograph=False)
    def classifier(image: tf.Tensor) -> dict[str, tf.Tensor]:
        trust = forward(split, image)
        return {PROBABILITIES_OUTPUT: tf.nn.softmax(trust[LOGITS_TENSOR], axis=-1), **trust}

    @tf.function(input_signature=_signature(input_shape, True), autograph=False)
    def gradcam(image: tf.Tensor, target: tf.Tensor) -> dict[str, tf.Tensor]:
        return gradcam_outputs(split, image, target)

    return classifier, gradcam
