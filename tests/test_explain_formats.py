"""/explain's image formats and raw map, and the encoders behind them.

Lossless means the decoded pixels are the overlay's, whichever encoder wrote them:
checked against the overlay composed directly from the contract functions.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from clients import ready_client
from fastapi.testclient import TestClient
from PIL import Image

from braincam.cam import compute_cam, flip_smoothed
from braincam.decoding import decode_image
from braincam.inference import OnnxModel
from braincam.overlay import (
    IMAGE_FORMATS,
    blend,
    colorize,
    encode_fast_png,
    encode_image,
    encode_png,
    panels,
)
from braincam.preprocessing import preprocess
from service.core.config import Settings

CPU = "CPUExecutionProvider"


def _decode_any(data: bytes) -> np.ndarray:
    """Pillow reads PNG, WebP and JPEG alike: uint8 RGB."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _picture(seed: int, height: int, width: int) -> np.ndarray:
    """A noisy RGB overlay-like picture (noise: nothing an encoder could cheat on)."""
    rng = np.random.default_rng(seed)
    gray = cv2.GaussianBlur(rng.integers(0, 256, (height, width), dtype=np.uint8), (5, 5), 0)
    cam = cv2.resize(rng.random((9, 9), dtype=np.float32), (width, height))
    return blend(gray, colorize(cam, "jet"), 0.4)


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (72, 80), (300, 257)])
def test_lossless_encoders_keep_every_pixel(shape: tuple[int, int]) -> None:
    rgb = _picture(sum(shape), *shape)
    for data in (
        encode_fast_png(rgb),
        encode_image(rgb, "png"),
        encode_image(rgb, "png", 6),
        encode_image(rgb, "webp"),
    ):
        np.testing.assert_array_equal(_decode_any(data), rgb)
    # OpenCV reads fpng's files too (the PNG the service wrote before fpng).
    bgr = cv2.imdecode(np.frombuffer(encode_fast_png(rgb), np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), rgb)


def test_fast_png_and_libpng_agree_and_jpeg_is_close() -> None:
    rgb = _picture(3, 120, 140)
    np.testing.assert_array_equal(_decode_any(encode_fast_png(rgb)), _decode_any(encode_png(rgb)))
    jpeg = _decode_any(encode_image(rgb, "jpeg"))
    assert jpeg.shape == rgb.shape
    assert np.abs(jpeg.astype(int) - rgb.astype(int)).mean() < 8  # lossy, but the picture


def test_encoders_reject_what_they_cannot_write() -> None:
    with pytest.raises(ValueError):
        encode_fast_png(np.zeros((4, 4), np.float32))
    with pytest.raises(Exception, match="image_format"):
        encode_image(np.zeros((4, 4, 3), np.uint8), "gif")


# --- through the service ------------------------------------------------------------


@pytest.fixture(scope="module")
def service(tiny_model_dir: Path) -> Iterator[TestClient]:
    with ready_client(Settings(model_dir=tiny_model_dir, providers=CPU)) as client:
        yield client


@pytest.fixture(scope="module")
def upload(demo_data: Path) -> bytes:
    gray = cv2.imread(str(sorted((demo_data / "Testing").glob("*/*.png"))[0]), 0)
    return cv2.imencode(".png", cv2.resize(gray, (90, 70)))[1].tobytes()


def _explain(client: TestClient, data: bytes, **form: str) -> dict:
    res = client.post("/explain", files={"file": ("x.png", data)}, data=form)
    assert res.status_code == 200, res.text
    return res.json()


def test_every_lossless_format_returns_the_same_pixels(
    service: TestClient, upload: bytes, tiny_model_dir: Path
) -> None:
    # The overlay composed from the contract functions, outside the service.
    model = OnnxModel(tiny_model_dir, providers=[CPU])
    decoded = decode_image(upload)
    out = model.gradcam(preprocess(decoded.pixels, model.spec.preprocessing)[None])
    cam = compute_cam("gradcam", out.activations, out.gradients, size=decoded.size)[0]
    heat = colorize(cam, "jet")
    overlay = blend(decoded.pixels, heat, 0.4)
    figure = panels(decoded.pixels, heat, overlay)
    expected = {"overlay": overlay, "heatmap": heat, "panels": figure}

    for fmt in ("png", "webp"):
        body = _explain(service, upload, images="all", image_format=fmt.upper())
        assert body["image_format"] == fmt and body["cam"] is None
        for name, pixels in expected.items():
            got = _decode_any(base64.b64decode(body[f"{name}_{fmt}"]))
            np.testing.assert_array_equal(got, pixels, err_msg=f"{name}_{fmt}")
        others = [f"{n}_{f}" for n in expected for f in IMAGE_FORMATS if f != fmt]
        assert all(body[key] is None for key in others)
    body = _explain(service, upload, image_format="jpg")
    assert body["image_format"] == "jpeg" and body["overlay_png"] is None
    jpeg = _decode_any(base64.b64decode(body["overlay_jpeg"]))
    assert jpeg.shape == overlay.shape


def test_libpng_level_setting_still_applies(tiny_model_dir: Path, upload: bytes) -> None:
    settings = Settings(model_dir=tiny_model_dir, providers=CPU, png_compression=9)
    with ready_client(settings) as client:
        body = _explain(client, upload)
    decoded = base64.b64decode(body["overlay_png"])
    assert decoded[:8] == b"\x89PNG\r\n\x1a\n"
    overlay = _decode_any(decoded)
    assert len(decoded) == len(encode_png(overlay, 9))  # the zlib level's file, not fpng's


@pytest.mark.parametrize("smooth", [False, True])
def test_raw_map_at_the_layer_resolution(
    service: TestClient, upload: bytes, tiny_model_dir: Path, smooth: bool
) -> None:
    model = OnnxModel(tiny_model_dir, providers=[CPU])
    h, w, _ = model.spec.explanation.activation_shape
    x = preprocess(decode_image(upload).pixels, model.spec.preprocessing)[None]
    batch = np.concatenate([x, x[:, :, ::-1]]) if smooth else x
    out = model.gradcam(np.ascontiguousarray(batch))
    cams = compute_cam("gradcam", out.activations, out.gradients)
    expected = flip_smoothed(cams[0], cams[1]) if smooth else cams[0]

    flag = {"smooth": "true"} if smooth else {}
    raw = _explain(service, upload, heatmap="raw", **flag)
    # No image unless asked for: the raw map costs no encoding.
    assert all(raw[k] is None for k in ("overlay_png", "heatmap_png", "panels_png"))
    cam = raw["cam"]
    assert cam["shape"] == [h, w] and cam["dtype"] == "float32" and cam["encoding"] == "base64"
    values = np.frombuffer(base64.b64decode(cam["data"]), dtype="<f4").reshape(h, w)
    np.testing.assert_allclose(values, expected, atol=1e-5)

    listed = _explain(service, upload, heatmap="LIST", images="overlay", **flag)
    assert listed["cam"]["encoding"] == "list" and listed["overlay_png"] is not None
    np.testing.assert_allclose(np.array(listed["cam"]["data"]), expected, atol=1e-5)


@pytest.mark.parametrize(
    "form",
    [{"image_format": "gif"}, {"heatmap": "bitmap"}, {"images": "overlay,movie"}],
)
def test_bad_format_parameters_are_422(service: TestClient, upload: bytes, form: dict) -> None:
    res = service.post("/explain", files={"file": ("x.png", upload)}, data=form)
    assert res.status_code == 422, res.text
    assert res.json()["code"]


def test_raw_occlusion_map_is_its_grid(tiny_model_dir: Path, upload: bytes) -> None:
    from braincam.occlusion import OcclusionSensitivity

    settings = Settings(model_dir=tiny_model_dir, providers=CPU, occlusion=True)
    with ready_client(settings) as client:
        body = _explain(client, upload, method="occlusion", heatmap="raw", images="overlay")
    model = OnnxModel(tiny_model_dir, providers=[CPU])
    x = preprocess(decode_image(upload).pixels, model.spec.preprocessing)[None]
    probs = model.predict(x)
    target = np.array([body["class_index"]])
    method = OcclusionSensitivity()
    expected = method.maps(method.drops(model.predict, x, target, base=probs[:, target[0]]))[0]
    cam = body["cam"]
    assert body["layer"] == "image" and cam["shape"] == list(expected.shape)
    values = np.frombuffer(base64.b64decode(cam["data"]), dtype="<f4").reshape(expected.shape)
    np.testing.assert_allclose(values, expected, atol=1e-5)
    assert body["overlay_png"] is not None
