"""Heatmap colouring, blending, panels and PNG encoding."""

from __future__ import annotations

import base64

import cv2
import numpy as np
import pytest

from braincam.errors import InvalidParameter
from braincam.overlay import (
    COLORMAPS,
    blend,
    colorize,
    encode_png,
    panels,
    to_base64_png,
)

H, W = 37, 53  # odd sizes catch width/height mix-ups


def ramp() -> np.ndarray:
    return np.tile(np.linspace(0, 1, W, dtype=np.float32), (H, 1))


def images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "gray": rng.integers(0, 256, (H, W), dtype=np.uint8),
        "gray1": rng.integers(0, 256, (H, W, 1), dtype=np.uint8),
        "rgb": rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
        "rgba": rng.integers(0, 256, (H, W, 4), dtype=np.uint8),
    }


def test_colormaps_include_the_usual_names() -> None:
    for name in ("jet", "turbo", "inferno", "viridis", "magma", "hot", "plasma"):
        assert name in COLORMAPS
    assert COLORMAPS["jet"] == cv2.COLORMAP_JET


def test_colorize_shape_dtype_and_rgb_order() -> None:
    heat = colorize(ramp(), "jet")
    assert heat.shape == (H, W, 3) and heat.dtype == np.uint8
    # jet: low values are blue, high values red (in RGB order).
    assert heat[0, 0, 2] > heat[0, 0, 0]
    assert heat[0, -1, 0] > heat[0, -1, 2]
    assert colorize(ramp(), "Turbo").shape == (H, W, 3)  # names are case-insensitive


def test_colorize_tolerates_nan_and_out_of_range() -> None:
    cam = ramp()
    cam[0, 0] = np.nan
    cam[0, 1] = 7.0
    assert colorize(cam).dtype == np.uint8


def test_unknown_colormap_raises() -> None:
    with pytest.raises(InvalidParameter) as err:
        colorize(ramp(), "rainbowish")
    assert "jet" in str(err.value)


@pytest.mark.parametrize("kind", ["gray", "gray1", "rgb", "rgba"])
def test_blend_and_panels_for_each_input_layout(kind: str) -> None:
    image = images()[kind]
    heat = colorize(ramp())
    out = blend(image, heat, 0.4)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    grid = panels(image, heat, out)
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
    assert grid.shape[0] > H  # title strip on top
    assert grid.shape[1] >= 3 * W
    if kind == "rgb":  # the image itself sits untouched under the first title
        np.testing.assert_array_equal(grid[grid.shape[0] - H :, :W], image)


def test_blend_extremes_and_resizes_heat_to_image() -> None:
    image = images()["rgb"]
    heat = colorize(ramp())
    np.testing.assert_array_equal(blend(image, heat, 0.0), image)
    np.testing.assert_array_equal(blend(image, heat, 1.0), heat)
    small_heat = colorize(np.zeros((8, 8), np.float32))
    assert blend(image, small_heat).shape == (H, W, 3)
    with pytest.raises(InvalidParameter):
        blend(image, heat, 1.5)


@pytest.mark.parametrize("level", [0, 1, 6, 9])
@pytest.mark.parametrize("kind", ["gray", "rgb", "rgba"])
def test_png_round_trip(kind: str, level: int) -> None:
    image = images()[kind]
    data = encode_png(image, level)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert back is not None
    if kind == "rgb":
        back = cv2.cvtColor(back, cv2.COLOR_BGR2RGB)
    elif kind == "rgba":
        back = cv2.cvtColor(back, cv2.COLOR_BGRA2RGBA)
    np.testing.assert_array_equal(back, image)


def test_base64_png() -> None:
    image = images()["rgb"]
    text = to_base64_png(image)
    assert isinstance(text, str)
    assert base64.b64decode(text) == encode_png(image)


@pytest.mark.parametrize("bad", [-1, 10, 1.5, True])
def test_bad_compression_rejected(bad: object) -> None:
    with pytest.raises(InvalidParameter):
        encode_png(images()["rgb"], bad)  # type: ignore[arg-type]
