"""Hand-written gradients for the spatial layers between the explained layer and
the head's first vector.

tf2onnx has no converter for MaxPoolGrad, and the gradient of a global average
pool over a dynamic batch converts to a wrong shape computation that fails only
at run time. So the Grad-CAM graph takes the autodiff gradient only through the
vector part of the head (Dense stacks, which export cleanly) and routes it back
through these spatial layers with plain ops. Each rule reproduces TensorFlow's own
gradient exactly, ties included (max pooling sends the gradient to the first
maximum of a window in row-major order); the parity gate checks that claim
against TensorFlow's autodiff on every export.
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


def _window_view(x: tf.Tensor, ph: int, pw: int) -> tf.Tensor:
    """[N,H,W,C] (cropped to whole windows) -> [N,Hp,Wp,C,ph*pw], row-major in-window."""
    hp, wp, c = int(x.shape[1]) // ph, int(x.shape[2]) // pw, int(x.shape[3])
    x = x[:, : hp * ph, : wp * pw, :]
    x = tf.reshape(x, [-1, hp, ph, wp, pw, c])
    x = tf.transpose(x, [0, 1, 3, 5, 2, 4])
    return tf.reshape(x, [-1, hp, wp, c, ph * pw])


def _unwindow(gw: tf.Tensor, x: tf.Tensor, ph: int, pw: int) -> tf.Tensor:
    """Inverse of `_window_view`, zero-padding the rows/cols the pooling dropped."""
    h, w, c = int(x.shape[1]), int(x.shape[2]), int(x.shape[3])
    hp, wp = h // ph, w // pw
    g = tf.reshape(gw, [-1, hp, wp, c, ph, pw])
    g = tf.transpose(g, [0, 1, 4, 2, 5, 3])
    g = tf.reshape(g, [-1, hp * ph, wp * pw, c])
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
    first_max = tf.one_hot(tf.argmax(_window_view(x, ph, pw), axis=-1), ph * pw, dtype=g.dtype)
    return _unwindow(first_max * g[..., None], x, ph, pw)


def _average_pool(layer: Any, x: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
    ph, pw = _pool_geometry(layer)
    spread = tf.ones_like(_window_view(x, ph, pw)) * (1.0 / (ph * pw))
    return _unwindow(spread * g[..., None], x, ph, pw)


def _global_max(layer: Any, x: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
    h, w, c = int(x.shape[1]), int(x.shape[2]), int(x.shape[3])
    flat = tf.reshape(x, [-1, h * w, c])
    first_max = tf.one_hot(tf.argmax(flat, axis=1), h * w, axis=1, dtype=g.dtype)
    return tf.reshape(first_max * tf.reshape(g, [-1, 1, c]), tf.shape(x))


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
