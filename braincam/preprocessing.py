"""The one preprocessing function: decoded pixels -> model input tensor.

The trainer, the exporter's parity check and the service all call `preprocess`.
Its parameters live in a `Preprocessing` object that is written to and read back
from the model directory's `model.json`; no caller hard-codes them.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

Scale = Literal["unit", "symmetric", "none"]
Layout = Literal["nhwc", "nchw"]
Interpolation = Literal["area", "linear", "cubic", "nearest"]


class Preprocessing(BaseModel):
    """Parameters of `preprocess`, stored verbatim in model.json."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    height: int = Field(150, ge=8, le=4096)
    width: int = Field(150, ge=8, le=4096)
    channels: Literal[1, 3] = 1
    # unit: x/255 in [0,1]; symmetric: x/127.5-1 in [-1,1]; none: raw 0..255 floats
    # (keras.applications models that carry their own Rescaling/normalisation layer).
    scale: Scale = "unit"
    # INTER_AREA is the right filter for downsizing MRI slices (no aliasing), and
    # deterministic across platforms, which the byte-identity test relies on.
    # linear/cubic/nearest are OpenCV's filters, which do not antialias when shrinking.
    interpolation: Interpolation = "area"
    # Per-channel normalisation applied after `scale`: (x - mean) / std, as torchvision's
    # ToTensor() + Normalize(mean, std) does with scale="unit". None: no normalisation.
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # nhwc: [H, W, C] per image (Keras); nchw: [C, H, W] (PyTorch and most ONNX models).
    layout: Layout = "nhwc"

    @model_validator(mode="after")
    def _check_normalisation(self) -> Preprocessing:
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std are given together or not at all")
        if self.mean is not None and self.std is not None:
            if len(self.mean) != self.channels or len(self.std) != self.channels:
                raise ValueError(f"mean and std need one value per channel ({self.channels})")
            if any(s <= 0 for s in self.std):
                raise ValueError("std values must be positive")
        return self

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The shape of one preprocessed image, in the model's layout."""
        if self.layout == "nchw":
            return (self.channels, self.height, self.width)
        return (self.height, self.width, self.channels)

    @property
    def width_axis(self) -> int:
        """Axis of the image width in a batch [N, ...] (for left-right flips)."""
        return 3 if self.layout == "nchw" else 2


_INTERPOLATION = {
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
}


def to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """uint8 HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA) -> uint8 HxWxchannels."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {pixels.dtype}")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 2:
        gray = pixels
        if channels == 1:
            return gray[:, :, None]
        return np.repeat(gray[:, :, None], 3, axis=2)
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(f"unsupported pixel layout {pixels.shape}")
    rgb = pixels[:, :, :3]
    if channels == 3:
        return np.ascontiguousarray(rgb)
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[:, :, None]


def preprocess(pixels: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """Decoded uint8 image -> float32 tensor [H, W, C] (or [C, H, W]) ready for the model."""
    img = to_channels(pixels, spec.channels)
    if img.shape[:2] != (spec.height, spec.width):
        img = cv2.resize(
            img, (spec.width, spec.height), interpolation=_INTERPOLATION[spec.interpolation]
        )
        if img.ndim == 2:  # cv2 drops a single channel axis
            img = img[:, :, None]
    out = img.astype(np.float32)
    if spec.scale == "unit":
        out *= np.float32(1.0 / 255.0)
    elif spec.scale == "symmetric":
        out = out * np.float32(1.0 / 127.5) - np.float32(1.0)
    if spec.mean is not None and spec.std is not None:
        mean = np.asarray(spec.mean, dtype=np.float32)
        std = np.asarray(spec.std, dtype=np.float32)
        out = ((out - mean) / std).astype(np.float32, copy=False)
    if spec.layout == "nchw":
        out = np.ascontiguousarray(out.transpose(2, 0, 1))
    return out


def preprocess_batch(images: list[np.ndarray], spec: Preprocessing) -> np.ndarray:
    """Several decoded images -> float32 batch [N, *spec.input_shape]."""
    if not images:
        return np.zeros((0, *spec.input_shape), dtype=np.float32)
    return np.stack([preprocess(img, spec) for img in images])
