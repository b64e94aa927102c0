"""The one preprocessing function: decoded pixels -> model input tensor.

The trainer, the exporter's parity check and the service all call `preprocess`.
Its parameters live in a `Preprocessing` object that is written to and read back
from the model directory's `model.json`; no caller hard-codes them.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

Scale = Literal["unit", "symmetric", "none"]


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
    interpolation: Literal["area", "linear"] = "area"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)


_INTERPOLATION = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR}


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
    """Decoded uint8 image -> float32 tensor [H, W, C] ready for the model."""
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
    return out


def preprocess_batch(images: list[np.ndarray], spec: Preprocessing) -> np.ndarray:
    """Several decoded images -> float32 batch [N, H, W, C]."""
    if not images:
        return np.zeros((0, *spec.input_shape), dtype=np.float32)
    return np.stack([preprocess(img, spec) for img in images])
