"""Model builders: the default small CNN and keras.applications backbones.

Every model takes the output of `braincam.preprocessing.preprocess` ([H,W,C] float32)
and ends in a softmax Dense layer named `predictions`. None carries a Rescaling
layer for the shared [0,1] scaling: that is the preprocessing's job, so the trainer
and the service cannot disagree about it. The layer Grad-CAM explains is returned
with the model and recorded in run.json (`explain_layer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import keras
import numpy as np
from keras import layers

from braincam.preprocessing import Scale
from trainer.errors import WeightsError

CNN = "cnn"
CnnHead = Literal["gap", "max", "flatten"]
CNN_HEADS: tuple[CnnHead, ...] = get_args(CnnHead)
# GlobalMaxPooling, chosen by measurement on the default demo dataset (300+75 per
# class, 150x150, seed 0, the demo build's 27 epochs; CAMs scored by
# trainer.explain_eval on the exported model, true class, 225 lesion images; energy
# = energy-in-mask, off-brain = CAM mass outside the brain on the tumour images):
#            test acc  params   Grad-CAM pointing / energy   HiResCAM energy / off-brain
#   max       1.000    0.46 M        1.00 / 0.27                  0.51 / 15 %
#   GAP       0.973    0.46 M        1.00 / 0.22                  0.27 / 34 %
# A scan holds a tumour if *any* region holds a lesion: the max is that rule, the
# average dilutes a small lesion with the healthy rest and rewards evidence spread
# over the whole head (GAP: val loss 0.075 after 27 epochs; max passed that in 10).
# Max pooling sends the class score's gradient only to where each feature peaks, so
# the maps the gradient weighs pixel by pixel (HiResCAM, LayerCAM) stay on the lesion.
# Flatten (measured earlier, 30 epochs: test acc 0.950, 5.70 M params) gives each of
# the 9x9 positions its own weights, lets the classifier key on *where* things are,
# and its Grad-CAM missed the small pituitary lesion entirely.
DEFAULT_CNN_HEAD: CnnHead = "max"
CNN_FILTERS = (32, 64, 128, 256)
CNN_EXPLAIN_LAYER = f"block{len(CNN_FILTERS)}_relu"
MIN_IMG_SIZE = 32
# Keras' default 0.99 averages over ~100 steps, three epochs of the demo data:
# the inference statistics then lag the weights badly (see callbacks.py).
BN_MOMENTUM = 0.9
HEAD_DROPOUT = (0.5, 0.3)


@dataclass(frozen=True)
class Backbone:
    """How a keras.applications backbone wants its input.

    `scale` is the shared preprocessing's scaling; `mean`/`std` (in that scale's
    units) become a fixed Normalization layer in front of the backbone for the
    families whose `preprocess_input` is a per-channel affine map. Channel order is
    ignored (caffe-style BGR): MRI slices are grey, so R = G = B.
    """

    scale: Scale
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


BACKBONES: dict[str, Backbone] = {
    # Carries its own Rescaling(1/255) + Normalization: feed raw 0..255.
    "EfficientNetB0": Backbone("none"),
    # preprocess_input "caffe": x - ImageNet mean on 0..255, no std.
    "ResNet50": Backbone("none", mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0)),
    # preprocess_input "tf": x/127.5 - 1.
    "MobileNetV2": Backbone("symmetric"),
    "Xception": Backbone("symmetric"),
    # preprocess_input "torch": (x/255 - mean) / std.
    "DenseNet121": Backbone("unit", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
}
ARCHS = (CNN, *BACKBONES)


def default_scale(arch: str) -> Scale:
    return "unit" if arch == CNN else BACKBONES[arch].scale


def default_channels(arch: str) -> int:
    return 1 if arch == CNN else 3  # ImageNet backbones have 3-channel stems


def build_cnn(
    input_shape: tuple[int, int, int], num_classes: int, head: CnnHead = DEFAULT_CNN_HEAD
) -> tuple[keras.Model, str]:
    """Four Conv-BN-ReLU-MaxPool blocks and a dense head (head: see DEFAULT_CNN_HEAD).

    At 150x150 the explained layer `block4_relu` is 18x18x256: fine enough for a
    Grad-CAM map, taken before the last pooling.
    """
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    for i, filters in enumerate(CNN_FILTERS, start=1):
        # No conv bias: the BatchNorm right after it has its own shift.
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{i}_conv")(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"block{i}_bn")(x)
        x = layers.ReLU(name=f"block{i}_relu")(x)
        x = layers.MaxPooling2D(2, name=f"block{i}_pool")(x)
    if head == "gap":
        x = layers.GlobalAveragePooling2D(name="gap")(x)
    elif head == "max":
        x = layers.GlobalMaxPooling2D(name="gmp")(x)
    else:
        x = layers.Flatten(name="flatten")(x)
    x = layers.Dropout(HEAD_DROPOUT[0], name="dropout_1")(x)
    x = layers.Dense(256, activation="relu", name="fc")(x)
    x = layers.Dropout(HEAD_DROPOUT[1], name="dropout_2")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name=f"braincam_cnn_{head}"), CNN_EXPLAIN_LAYER


def build_backbone(
    arch: str, input_shape: tuple[int, int, int], num_classes: int
) -> tuple[keras.Model, keras.Model, str]:
    """keras.applications backbone (random init, never downloads) + GAP head.

    The backbone's layers are built into the outer graph (not nested as one layer),
    so the explained layer is addressable by its plain name.
    """
    if input_shape[-1] != 3:
        raise ValueError(f"{arch} needs 3 input channels (got {input_shape[-1]}): use --channels 3")
    info = BACKBONES[arch]
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    if info.mean is not None and info.std is not None:
        x = layers.Normalization(
            mean=list(info.mean), variance=[s * s for s in info.std], name="input_norm"
        )(x)
    base = getattr(keras.applications, arch)(include_top=False, weights=None, input_tensor=x)
    explain_layer = base.layers[-1].name
    y = layers.GlobalAveragePooling2D(name="gap")(base.output)
    y = layers.Dropout(0.3, name="dropout")(y)
    outputs = layers.Dense(num_classes, activation="softmax", name="predictions")(y)
    return keras.Model(inputs, outputs, name=f"braincam_{arch.lower()}"), base, explain_layer


def build_model(
    arch: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    weights: Path | None = None,
    cnn_head: CnnHead = DEFAULT_CNN_HEAD,
) -> tuple[keras.Model, str]:
    """-> (model, name of the layer Grad-CAM explains)."""
    if min(input_shape[:2]) < MIN_IMG_SIZE:
        raise ValueError(f"image size must be at least {MIN_IMG_SIZE} pixels")
    if arch == CNN:
        model, layer = build_cnn(input_shape, num_classes, cnn_head)
        targets = [model]
    elif arch in BACKBONES:
        model, base, layer = build_backbone(arch, input_shape, num_classes)
        targets = [model, base]  # a backbone-only weights file matches the base model
    else:
        raise ValueError(f"unknown architecture '{arch}' (choose from {', '.join(ARCHS)})")
    if weights is not None:
        load_weights(targets, weights)
    return model, layer


def _snapshot(model: keras.Model) -> list[np.ndarray]:
    return [np.array(w) for w in model.get_weights()]


def load_weights(targets: list[keras.Model], path: Path) -> int:
    """Load a local weights file into the first target it matches; -> tensors changed.

    Layers whose shapes differ (e.g. a classifier head for another number of classes)
    are skipped; a file that changes nothing at all is an error, not a silent no-op.
    """
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    name = path.name.lower()
    if not name.endswith((".keras", ".h5", ".hdf5", ".weights.json")):
        raise WeightsError(f"{path}: expected a .keras, .weights.h5 or legacy .h5 weights file")
    # Legacy .h5 files (the keras.applications downloads) are matched by layer name;
    # Keras 3 files (.keras, .weights.h5) by structure.
    legacy = name.endswith((".h5", ".hdf5")) and not name.endswith(".weights.h5")
    first = targets[0]
    before = _snapshot(first)
    errors: list[str] = []
    for target in targets:
        try:
            if legacy:
                target.load_weights(path, by_name=True, skip_mismatch=True)
            else:
                target.load_weights(path, skip_mismatch=True)
        except (ValueError, KeyError, OSError) as exc:
            errors.append(f"{target.name}: {exc}")
            continue
        changed = sum(
            not np.array_equal(a, b) for a, b in zip(before, _snapshot(first), strict=True)
        )
        if changed:
            return changed
    detail = f" ({'; '.join(errors)})" if errors else ""
    raise WeightsError(f"{path} matched no layer of the model{detail}")
