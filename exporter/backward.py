"""Hand-written gradients for the spatial layers between the explained layer and
the head's first vector.

tf2onnx has no converter for MaxPoolGrad, and the gradient of a global average
pool over a dynamic batch converts to a wrong shape computation that fails only
at run time. So the Grad-CAM graph takes the autodiff gradient only through the
vector part of the head (Dense stacks, which export cleanly) and routes it back
through these spatial layers with plain ops. Each rule reproduces TensorFlow's own
gradient exactly, ties included (max pooling sends the gradient to the first
maximum of a window in row-major order, global max pooling shares it among all
maxima); the parity gate checks that claim against TensorFlow's autodiff on every
export.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

Backward = Callable[[keras.layers.Layer, tf.Tensor, tf.Tensor], tf.Tensor]


def _identity(layer: Any, x: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
    return g


def _relu(layer: Any, x: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
    return g * tf.cast(x > 0, g.dtype)


def _flatten(layer: Any, x: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
    return tf.reshape(g, tf.shape(x))


def _global_average(layer: Any, x: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
    h, w = int(x.shape[1]), int(x.shape[2])
    g = tf.reshape(g, [-1, 1, 1, int(x.shape[3])])  # keepdims or not
    return g * tf.ones_like(x) * (1.0 / (h * w))


def _interleave(parts: list[list[tf.Tensor]], x: tf.Tensor) -> tf.Tensor:
    """parts[i][j] [N,Hp,Wp,C], window position (i, j) -> [N,H,W,C] like x.

    Stacks and reshapes only: the windowed view as one 6-D transpose costs more
    than the rest of the gradient in ONNX Runtime. Rows/cols the pooling dropped
    get zeros.
    """
    ph, pw = len(parts), len(parts[0])
    h, w, c = int(x.shape[1]), int(x.shape[2]), int(x.shape[3])
    hp, wp = h // ph, w // pw
    rows = [tf.stack(row, axis=3) for row in parts]  # [N,Hp,Wp,pw,C] each
    g = tf.reshape(tf.stack(rows, axis=2), [-1, hp * ph, wp * pw, c])  # [N,Hp,ph,Wp,pw,C]
    return tf.pad(g, [[0, 0], [0, h - hp * ph], [0, w - wp * pw], [0, 0]])


def _pool_geometry(layer: Any) -> tuple[int, int]:
    ph, pw = (int(v) for v in layer.pool_size)
    strides = tuple(int(v) for v in (layer.strides or layer.pool_size))
    if strides != (ph, pw) or layer.padding != "valid":
        raise NotImplementedError(
            "only non-overlapping 'valid' pooling has a hand-written gradient"
        )
    return ph, pw


def _max_pool(layer: Any, x: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
    ph, pw = _pool_geometry(layer)
    hp, wp = int(x.shape[1]) // ph, int(x.shape[2]) // pw
    whole = x[:, : hp * ph, : wp * pw, :]  # the rows/cols valid pooling reads
    # The same MaxPool as the forward pass (the converter keeps one node for both).
    peak = tf.nn.max_pool2d(whole, (ph, pw), (ph, pw), "VALID")
    # Each window position, in row-major order, takes the gradient if it holds the
    # maximum and no earlier position did: TensorFlow's tie-breaking, exactly.
    taken: tf.Tensor | None = None
    parts: list[list[tf.Tensor]] = []
    for i in range(ph):
        parts.append([])
        for j in range(pw):
            first = tf.equal(whole[:, i::ph, j::pw, :], peak)
            if taken is None:
                taken = first
            else:
                first = tf.logical_and(first, tf.logical_not(taken))
                taken = tf.logical_or(taken, first)
            parts[i].append(g * tf.cast(first, g.dtype))
    return _interleave(parts, x)


def _average_pool(layer: Any, x: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
    ph, pw = _pool_geometry(layer)
    share = g * (1.0 / (ph * pw))
    return _interleave([[share] * pw for _ in range(ph)], x)


def _global_max(layer: Any, x: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
    # tf.reduce_max's own gradient: shared equally by every position holding the
    # maximum (unlike MaxPool's first-maximum rule). Ties are common: a channel the
    # ReLU silenced everywhere has its maximum, 0, at every position.
    peak = tf.reduce_max(x, axis=[1, 2], keepdims=True)
    hit = tf.cast(tf.equal(x, peak), g.dtype)
    share = hit / tf.reduce_sum(hit, axis=[1, 2], keepdims=True)
    return share * tf.reshape(g, [-1, 1, 1, int(x.shape[3])])


def _batch_norm(layer: Any, x: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
    scale = tf.math.rsqrt(tf.convert_to_tensor(layer.moving_variance) + layer.epsilon)
    if layer.scale:
        scale = scale * tf.convert_to_tensor(layer.gamma)
    return g * scale


def _activation(layer: Any, x: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
    name = getattr(layer.activation, "__name__", "")
    if name == "relu":
        return _relu(layer, x, g)
    if name == "linear":
        return g
    raise NotImplementedError(f"no hand-written gradient for activation '{name}'")


def _relu_layer(layer: Any, x: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
    if (
        layer.max_value is not None
        or float(layer.negative_slope) != 0
        or float(layer.threshold) != 0
    ):
        raise NotImplementedError("only the plain ReLU layer has a hand-written gradient")
    return _relu(layer, x, g)


def _conv_geometry(layer: Any) -> tuple[int, int]:
    kh, kw = (int(v) for v in layer.kernel_size)
    if (
        tuple(layer.strides) != (1, 1)
        or tuple(layer.dilation_rate) != (1, 1)
        or getattr(layer, "groups", 1) != 1
        or layer.data_format != "channels_last"
        or (layer.padding == "same" and (kh % 2 == 0 or kw % 2 == 0))
        or layer.padding not in ("same", "valid")
        or getattr(layer.activation, "__name__", "") not in ("relu", "linear")
    ):
        raise NotImplementedError(
            "only stride-1, undilated Conv2D ('valid', or 'same' with an odd kernel) "
            "with a linear or ReLU activation has a hand-written gradient"
        )
    return kh, kw


def _conv2d(layer: Any, x: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
    # The input gradient of a stride-1 convolution is the convolution of the output
    # gradient with the kernel flipped in space and transposed in channels: a plain
    # Conv in ONNX, where TF's Conv2DBackpropInput would bring ShapeN along.
    kh, kw = _conv_geometry(layer)
    if getattr(layer.activation, "__name__", "") == "relu":
        # ReLU'(pre-activation) == (output > 0). Calling the layer again costs nothing:
        # the converter merges it with the identical forward node (one Conv exported).
        g = _relu(layer, layer(x), g)
    kernel = tf.transpose(tf.reverse(tf.convert_to_tensor(layer.kernel), [0, 1]), [0, 1, 3, 2])
    if layer.padding == "valid":
        g = tf.pad(g, [[0, 0], [kh - 1, kh - 1], [kw - 1, kw - 1], [0, 0]])
        return tf.nn.conv2d(g, kernel, strides=1, padding="VALID")
    return tf.nn.conv2d(g, kernel, strides=1, padding="SAME")


RULES: dict[type, Backward] = {
    keras.layers.Conv2D: _conv2d,
    keras.layers.MaxPooling2D: _max_pool,
    keras.layers.AveragePooling2D: _average_pool,
    keras.layers.GlobalAveragePooling2D: _global_average,
    keras.layers.GlobalMaxPooling2D: _global_max,
    keras.layers.Flatten: _flatten,
    keras.layers.Dropout: _identity,
    keras.layers.SpatialDropout2D: _identity,
    keras.layers.GaussianNoise: _identity,
    keras.layers.GaussianDropout: _identity,
    keras.layers.BatchNormalization: _batch_norm,
    keras.layers.Activation: _activation,
    keras.layers.ReLU: _relu_layer,
}


def rule_for(layer: keras.layers.Layer) -> Backward | None:
    """The hand-written gradient of `layer`, or None to leave it to autodiff."""
    rule = RULES.get(type(layer))
    if rule is None:
        return None
    try:  # validate the layer's configuration once, outside the traced graph
        if rule in (_max_pool, _average_pool):
            _pool_geometry(layer)
        elif rule is _conv2d:
            _conv_geometry(layer)
        elif (
            rule is _relu_layer
            and (
                layer.max_value is not None
                or float(layer.negative_slope) != 0
                or float(layer.threshold) != 0
            )
        ) or (
            rule is _activation
            and getattr(layer.activation, "__name__", "")
            not in (
                "relu",
                "linear",
            )
        ):
            return None
    except NotImplementedError:
        return None
    return rule
