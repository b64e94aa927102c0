"""Heatmap colouring, blending, side-by-side panels and image encoding for /explain.

All images here are uint8 RGB (the decoder's convention); OpenCV's BGR order is
confined to the cv2 calls that need it (applyColorMap, imencode).
"""

from __future__ import annotations

import base64
import io
from typing import Literal

import cv2
import numpy as np
import pybase64

from braincam.errors import InvalidParameter
from braincam.preprocessing import to_channels

# Every OpenCV colormap this cv2 build has, by lower-case name ("jet", "turbo", ...).
COLORMAPS: dict[str, int] = {
    name[len("COLORMAP_") :].lower(): int(getattr(cv2, name))
    for name in sorted(dir(cv2))
    if name.startswith("COLORMAP_")
}

# Chosen with benchmarks/bench_encoders.py (650x591 overlay / 1958x626 3-panel, one
# core): level 1 takes ~12 / ~26 ms; level 6 ~58 / ~107 ms for files only ~10 % smaller;
# level 9 another 5x for 3 % more; level 0 (~1 / ~4 ms) ships raw pixels, 2.5-3.8x the
# bytes (and base64 adds a third). Level 1 is where the time/size curve bends.
DEFAULT_PNG_COMPRESSION = 1
# A fixed SUB filter instead of libpng's per-row adaptive choice: 1.5-1.7x faster at
# level 1 (1.2x at 6-9) for sizes within ~2 % (same benchmark). OpenCV builds without
# the flag keep libpng's adaptive filtering.
_PNG_FILTER: list[int] = (
    [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB]
    if hasattr(cv2, "IMWRITE_PNG_FILTER") and hasattr(cv2, "IMWRITE_PNG_FILTER_SUB")
    else []
)

PANEL_TITLES = ("Original", "Heatmap", "Overlay")
# Burned into every image of an answer the out-of-distribution gate flagged (the
# DICOM Secondary Capture, the CLI's overlays; the web page draws the same on its
# downloads): an image saved on its own still says it.
OOD_BANNER = "UNLIKE TRAINING DATA"
_BANNER_FILL = (176, 0, 32)  # RGB: dark red
_BANNER_TEXT = (255, 255, 255)
_PANEL_GAP = 4  # px of background between panels
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)


def _rgb_lut(code: int) -> np.ndarray:
    """The colormap as a 256-entry RGB table: applyColorMap with it needs no BGR->RGB pass."""
    lut = _LUTS.get(code)
    if lut is None:
        ramp = np.arange(256, dtype=np.uint8).reshape(256, 1)
        lut = cv2.cvtColor(cv2.applyColorMap(ramp, code), cv2.COLOR_BGR2RGB)
        _LUTS[code] = lut
    return lut


_LUTS: dict[int, np.ndarray] = {}


def colorize(cam: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """CAM [H,W] in [0,1] -> uint8 RGB [H,W,3] through a named colormap.

    NaN and values below 0 colour as 0, values above 1 as 1. OpenCV does the
    rounding and saturation in one pass (numpy's clip/round/cast took ~15x longer on
    a 1024x1024 map), then a table lookup in RGB order.
    """
    code = COLORMAPS.get(colormap.lower()) if isinstance(colormap, str) else None
    if code is None:
        raise InvalidParameter(
            f"unknown colormap {colormap!r}; valid colormaps: {', '.join(COLORMAPS)}"
        )
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2:
        raise ValueError(f"a CAM to colorize must be [H,W], got shape {cam.shape}")
    # Negatives and NaN to 0 first (x > 0 is false for both): convertScaleAbs
    # saturates above 255 but would take |x| below 0.
    _, positive = cv2.threshold(cam, 0.0, 0.0, cv2.THRESH_TOZERO)
    levels = cv2.convertScaleAbs(positive, alpha=255.0)
    return cv2.applyColorMap(levels, _rgb_lut(code))


def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 gray [H,W] / [H,W,1], RGB or RGBA -> uint8 RGB [H,W,3].

    Alpha is dropped, exactly as `preprocess` drops it, so the picture shown is the
    picture the model saw.
    """
    pixels = np.asarray(image)
    if pixels.dtype == np.uint8 and pixels.ndim == 2:
        return cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB)  # ~10x numpy's repeat
    return to_channels(pixels, 3)


def _fit(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    if rgb.shape[:2] == (height, width):
        return rgb
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR)


def blend(image: np.ndarray, heat_rgb: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """(1 - alpha) * image + alpha * heat, uint8 RGB at the image's own size.

    Prefer colorizing a CAM already resized to the image (see `cam.resize_cam`):
    resizing a coloured heatmap here interpolates colours, not CAM values.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise InvalidParameter(f"alpha must be between 0 and 1, got {alpha}")
    base = to_rgb(image)
    heat = _fit(to_rgb(heat_rgb), base.shape[0], base.shape[1])
    return cv2.addWeighted(base, 1.0 - float(alpha), heat, float(alpha), 0.0)


def _title_strip(title: str, width: int, height: int) -> np.ndarray:
    strip = np.full((height, width, 3), _BACKGROUND, dtype=np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = height / 40.0
    (tw, th), _ = cv2.getTextSize(title, font, scale, 1)
    if tw > width - 4:  # narrow images: shrink the title to fit its panel
        scale *= (width - 4) / tw
        (tw, th), _ = cv2.getTextSize(title, font, scale, 1)
    org = (max((width - tw) // 2, 0), (height + th) // 2)
    cv2.putText(strip, title, org, font, scale, _TEXT, 1, cv2.LINE_AA)
    return strip


def panels(
    image: np.ndarray,
    heat_rgb: np.ndarray,
    overlay: np.ndarray,
    titles: tuple[str, str, str] = PANEL_TITLES,
) -> np.ndarray:
    """Original | Heatmap | Overlay side by side, each titled, uint8 RGB.

    Every panel is shown at the original image's size.
    """
    base = to_rgb(image)
    h, w = base.shape[:2]
    tiles = [base, _fit(to_rgb(heat_rgb), h, w), _fit(to_rgb(overlay), h, w)]
    # Title height scales with the image, within readable bounds.
    strip_h = int(np.clip(round(h * 0.06), 16, 40))
    columns = [
        np.vstack([_title_strip(t, w, strip_h), tile])
        for t, tile in zip(titles, tiles, strict=True)
    ]
    gap = np.full((h + strip_h, _PANEL_GAP, 3), _BACKGROUND, dtype=np.uint8)
    return np.hstack([columns[0], gap, columns[1], gap, columns[2]])


def banner_height(height: int) -> int:
    """Rows the banner covers: ~8 % of the image, within readable bounds."""
    return min(int(np.clip(round(height * 0.08), 10, 48)), height)


def with_banner(rgb: np.ndarray, text: str = OOD_BANNER) -> np.ndarray:
    """A copy of a uint8 RGB image with `text` burned in, white on red, across its top
    rows. Drawn over the image rather than added to it: the picture keeps its size,
    so an overlay stays aligned with the slice it was computed on."""
    out = np.array(to_rgb(rgb), dtype=np.uint8, copy=True)
    h, w = out.shape[:2]
    band = banner_height(h)
    out[:band] = _BANNER_FILL
    font, thickness = cv2.FONT_HERSHEY_SIMPLEX, max(1, band // 20)
    scale = cv2.getFontScaleFromHeight(font, max(int(band * 0.55), 1), thickness)
    (tw, th), _ = cv2.getTextSize(text, font, scale, thickness)
    if tw > w - 4:  # narrow images: the text shrinks to the width
        scale *= (w - 4) / tw
        (tw, th), _ = cv2.getTextSize(text, font, scale, thickness)
    org = (max((w - tw) // 2, 0), (band + th) // 2)
    cv2.putText(out, text, org, font, scale, _BANNER_TEXT, thickness, cv2.LINE_AA)
    return out


def encode_png(rgb: np.ndarray, compression: int = DEFAULT_PNG_COMPRESSION) -> bytes:
    """uint8 gray/RGB/RGBA -> PNG bytes; compression is the zlib level 0 (none) .. 9."""
    if (
        isinstance(compression, bool)
        or not isinstance(compression, (int, np.integer))
        or not (0 <= int(compression) <= 9)
    ):
        raise InvalidParameter(f"PNG compression must be an integer 0..9, got {compression!r}")
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGBA2BGRA)
    elif not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 1)):
        raise ValueError(f"unsupported pixel layout {arr.shape}")
    ok, buf = cv2.imencode(
        ".png", arr, [cv2.IMWRITE_PNG_COMPRESSION, int(compression), *_PNG_FILTER]
    )
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def to_base64_png(rgb: np.ndarray, compression: int = DEFAULT_PNG_COMPRESSION) -> str:
    """PNG as a base64 ASCII string (for JSON responses)."""
    return base64.b64encode(encode_png(rgb, compression)).decode("ascii")


# The formats /explain can return its images in. PNG and WebP here are lossless: the
# decoded pixels are the overlay's, whichever encoder wrote them (tests check it).
ImageFormat = Literal["png", "webp", "jpeg"]
IMAGE_FORMATS: tuple[ImageFormat, ...] = ("png", "webp", "jpeg")
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
JPEG_QUALITY = 90


def encode_fast_png(rgb: np.ndarray) -> bytes:
    """uint8 RGB -> PNG with fpng: a fixed filter and a fast deflate of its own.

    Measured with benchmarks/bench_encoders.py on 512x512 / 1024x1024 overlays: ~1 /
    ~5 ms against ~25 / ~85 ms for libpng at level 1, for files ~1.3x larger. Where
    the fpng wheel is missing (it is a base dependency) libpng at level 1 writes it.
    """
    arr = np.ascontiguousarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"fpng writes uint8 RGB/RGBA, got {arr.dtype} {arr.shape}")
    try:
        import fpng
    except ImportError:
        return encode_png(arr, DEFAULT_PNG_COMPRESSION)
    return bytes(fpng.from_ndarray(arr))


def encode_webp(rgb: np.ndarray) -> bytes:
    """uint8 RGB -> lossless WebP (Pillow; method 0: libwebp's fastest lossless
    effort). ~1.8x smaller than fpng's PNG and ~10x slower (same benchmark)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(
        buf, format="WEBP", lossless=True, method=0, quality=0
    )
    return buf.getvalue()


def encode_jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """uint8 RGB -> JPEG (lossy: the smallest and fastest; pixels are not kept)."""
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def encode_image(
    rgb: np.ndarray, image_format: str = "png", png_compression: int | None = None
) -> bytes:
    """uint8 RGB -> bytes in `image_format`. PNG: fpng unless a zlib level is given
    (then libpng at that level, for smaller files at several times the time)."""
    if image_format == "png":
        if png_compression is None:
            return encode_fast_png(rgb)
        return encode_png(rgb, png_compression)
    if image_format == "webp":
        return encode_webp(rgb)
    if image_format == "jpeg":
        return encode_jpeg(rgb)
    raise InvalidParameter(
        f"unknown image_format {image_format[:16]!r}; choose from {', '.join(IMAGE_FORMATS)}"
    )


def to_base64(
    rgb: np.ndarray, image_format: str = "png", png_compression: int | None = None
) -> str:
    """`encode_image` as a base64 ASCII string (for JSON responses).

    pybase64 (SIMD) encodes ~3x faster than the standard library: ~1.7 against ~5 ms
    for a 3 MB image, the size of a 1024x1024 overlay that barely compresses.
    """
    return pybase64.b64encode(encode_image(rgb, image_format, png_compression)).decode("ascii")
