"""tf.data input pipelines, training-time augmentation, class weights (the validation
split: braincam/splits.py, shared with the exporter).

Augmentation lives here, in the tf.data map, never inside the model: the saved and
exported model must be exactly preprocess -> network, as the service runs it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from braincam.preprocessing import Scale

# The reference notebooks' ImageDataGenerator settings.
ROTATION_DEGREES = 10.0
SHIFT = 0.1
SHEAR = 0.1
ZOOM = 0.1
BRIGHTNESS = 0.1
CONTRAST = 0.1

VALUE_RANGES: dict[Scale, tuple[float, float]] = {
    "unit": (0.0, 1.0),
    "symmetric": (-1.0, 1.0),
    "none": (0.0, 255.0),
}


def class_weights(y: np.ndarray, num_classes: int) -> dict[int, float]:
    """'balanced' weights: each class contributes equally to the loss."""
    classes = np.arange(num_classes)
    weights = compute_class_weight("balanced", classes=classes, y=y)
    return {int(c): float(w) for c, w in zip(classes, weights, strict=True)}


def augmentation_summary() -> dict[str, float | str]:
    """The augmentation settings, as recorded in run.json."""
    return {"rotation_degrees": ROTATION_DEGREES, "shift": SHIFT, "shear": SHEAR, "zoom": ZOOM,
            "horizontal_flip": "yes", "brightness": BRIGHTNESS, "contrast": CONTRAST,
            "fill": "constant (scale minimum)"}


class RandomAffine:
    """Flip, rotation, shift, shear and zoom composed into ONE affine map per image.

    One resampling instead of one per Keras layer (RandomRotation, RandomTranslation,
    RandomShear, RandomZoom each interpolate again): four stacked bilinear passes
    low-pass filter every training image, so the network would learn on a blurrier
    texture than the unaugmented images it is tested and served on; one pass is also
    a quarter of the cost.
    Parameters follow ImageDataGenerator: the matrix maps output to input pixels.
    """

    def __init__(self, seed: int, fill_value: float) -> None:
        self.rng = tf.random.Generator.from_seed(seed)
        self.fill_value = fill_value

    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        shape = tf.shape(images)
        n, h, w = shape[0], tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)

        def uniform(low: float, high: float) -> tf.Tensor:
            return self.rng.uniform([n], low, high)

        theta = uniform(-ROTATION_DEGREES, ROTATION_DEGREES) * (math.pi / 180.0)
        shear = uniform(-SHEAR, SHEAR)
        zx, zy = uniform(1.0 - ZOOM, 1.0 + ZOOM), uniform(1.0 - ZOOM, 1.0 + ZOOM)
        flip = tf.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0)
        tx, ty = uniform(-SHIFT, SHIFT) * w, uniform(-SHIFT, SHIFT) * h
        cos, sin = tf.cos(theta), tf.sin(theta)
        # A = rotation @ shear @ zoom @ flip, acting on coordinates about the centre.
        a00, a01 = cos * zx * flip, (cos * shear - sin) * zy
        a10, a11 = sin * zx * flip, (sin * shear + cos) * zy
        cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
        zeros = tf.zeros_like(theta)
        transforms = tf.stack([
            a00, a01, cx - a00 * cx - a01 * cy + tx,
            a10, a11, cy - a10 * cx - a11 * cy + ty,
            zeros, zeros,
        ], axis=1)
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=images, transforms=transforms, output_shape=shape[1:3],
            fill_value=self.fill_value, interpolation="BILINEAR", fill_mode="CONSTANT",
        )


def augmenter(scale: Scale, seed: int) -> Callable[[tf.Tensor], tf.Tensor]:
    """Seeded random geometry + intensity jitter for a batch [N,H,W,C]."""
    low, high = VALUE_RANGES[scale]
    value_range = (low, high)
    # Black (the scale's minimum) outside the image: MRI background, not a reflection
    # that would paste brain tissue into the corners.
    geometry = RandomAffine(seed, fill_value=low)
    intensity = [
        keras.layers.RandomBrightness(BRIGHTNESS, value_range=value_range, seed=seed + 1),
        keras.layers.RandomContrast(CONTRAST, value_range=value_range, seed=seed + 2),
    ]

    def apply(images: tf.Tensor) -> tf.Tensor:
        images = geometry(images)
        for layer in intensity:
            images = layer(images, training=True)
        # Interpolation and jitter can leave the valid range; the model never sees
        # values outside it at inference.
        return tf.clip_by_value(images, low, high)

    return apply


def make_dataset(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    shuffle_seed: int | None = None,
    augment: Callable[[tf.Tensor], tf.Tensor] | None = None,
) -> tf.data.Dataset:
    """(x, y) arrays -> cached, optionally shuffled and augmented, batched, prefetched."""
    ds = tf.data.Dataset.from_tensor_slices((x, y)).cache()
    if shuffle_seed is not None:
        ds = ds.shuffle(len(x), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if augment is not None:
        # Batched augmentation: one kernel call per batch instead of per image.
        ds = ds.map(lambda a, b: (augment(a), b), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
