"""Hardening: the hostile-input corpus, header size checks, timeouts, the API key,
security headers and CORS, against the real app serving the tiny exported model."""

from __future__ import annotations

import gzip
import struct
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from clients import ready_client
from fastapi.testclient import TestClient
from hostile_inputs import (
    brain_slice,
    dicom,
    encode,
    hostile_cases,
    nifti,
    png_bomb,
    png_declaring,
    unusual_cases,
)

from braincam.decision import decide
from braincam.decoding import decode_image, pixel_budget
from braincam.errors import ImageTooLarge, UndecodableImage, UnsupportedMediaType
from braincam.image_headers import raster_size
from braincam.inference import OnnxModel
from braincam.preprocessing import preprocess
from service.core.config import Settings

CPU = "CPUExecutionProvider"
MAX_UPLOAD_MB = 1.0
MAX_UPLOAD_BYTES = int(MAX_UPLOAD_MB * 2**20)
HOSTILE = hostile_cases(MAX_UPLOAD_BYTES)
UNUSUAL = unusual_cases()


def _client(model_dir: Path, **overrides: Any) -> AbstractContextManager[TestClient]:
    settings = Settings(
        model_dir=model_dir, providers=CPU, max_upload_mb=MAX_UPLOAD_MB, **overrides
    )
    return ready_client(settings)


@pytest.fixture(scope="module")
def service(tiny_model_dir: Path) -> Iterator[TestClient]:
    with _client(tiny_model_dir) as client:
        yield client


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> OnnxModel:
    return OnnxModel(tiny_model_dir, providers=[CPU])


def assert_json_error(res: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert res.status_code == status, res.text[:500]
    assert res.headers["content-type"].startswith("application/json")
    assert res.headers["x-content-type-options"] == "nosniff"
    body = res.json()
    assert set(body) == {"detail", "code"}, body
    assert isinstance(body["detail"], str) and 0 < len(body["detail"]) < 600, body
    if code is not None:
        assert body["code"] == code, body
    for leak in ("Traceback", 'File "', "/tmp", "/work", "site-packages", ".py"):
        assert leak not in body["detail"], body
    return body


def expected_probabilities(model: OnnxModel, data: bytes) -> dict[str, float]:
    x = preprocess(decode_image(data).pixels, model.spec.preprocessing)[None]
    return decide(model.predict(x)[0], model.spec).probabilities


# --- the corpus -------------------------------------------------------------------------


def test_corpus_has_twenty_distinct_hostile_kinds() -> None:
    names = [case.name for case in HOSTILE]
    assert len(set(names)) == len(names) >= 20
    assert len({case.name for case in UNUSUAL}) == len(UNUSUAL)


@pytest.mark.parametrize("case", HOSTILE, ids=lambda c: c.name)
def test_hostile_input_is_a_4xx_json_error_and_the_service_lives_on(
    service: TestClient, case: Any
) -> None:
    res = service.request(**case.request())
    assert 400 <= case.status < 500
    assert_json_error(res, case.status, case.code)
    assert service.get("/v2/health/live").status_code == 200
    good = service.post("/predict", files={"file": ("a.png", encode(".png", brain_slice()))})
    assert good.status_code == 200, good.text


@pytest.mark.parametrize("case", UNUSUAL, ids=lambda c: c.name)
def test_unusual_but_valid_input_is_answered_correctly(
    service: TestClient, model: OnnxModel, case: Any
) -> None:
    res = service.request(**case.request())
    assert res.status_code == 200, res.text
    data = _file_bytes(case.request())
    assert res.json()["probabilities"] == pytest.approx(
        expected_probabilities(model, data), abs=1e-6
    )


def _file_bytes(request: dict[str, Any]) -> bytes:
    if "files" in request:
        return bytes(request["files"]["file"][1])
    # raw multipart: the part between the blank line after the headers and the boundary
    body: bytes = request["content"]
    start = body.index(b"\r\n\r\n") + 4
    return body[start : body.rindex(b"\r\n--")]


def test_error_detail_does_not_echo_large_input(service: TestClient) -> None:
    png = encode(".png", brain_slice())
    res = service.post("/explain", files={"file": ("a.png", png)}, data={"method": "m" * 50_000})
    body = assert_json_error(res, 422, "invalid_parameter")
    assert "m" * 100 not in body["detail"]


# --- sizes from headers -----------------------------------------------------------------


@pytest.mark.parametrize(
    "ext,fmt", [(".png", "png"), (".jpg", "jpeg"), (".bmp", "bmp"), (".tiff", "tiff")]
)
def test_header_size_equals_the_decoded_size(ext: str, fmt: str) -> None:
    gray = cv2.resize(brain_slice(), (53, 37))
    rgb = cv2.applyColorMap(gray, cv2.COLORMAP_JET)
    variants = [gray, rgb, np.dstack([rgb, gray]), gray.astype(np.uint16) * 250]
    for img in variants:
        data = encode(ext, img)
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert raster_size(data, fmt) == (decoded.shape[1], decoded.shape[0]) == (53, 37)
    progressive = encode(".jpg", rgb, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    if fmt == "jpeg":
        assert raster_size(progressive, fmt) == (53, 37)


def test_big_endian_and_bmp_core_headers() -> None:
    # Big-endian classic TIFF: 2 entries (width SHORT 300, length LONG 200).
    ifd = struct.pack(">H", 2) + struct.pack(">HHIHH", 256, 3, 1, 300, 0)
    ifd += struct.pack(">HHII", 257, 4, 1, 200) + bytes(4)
    assert raster_size(b"MM\x00*" + struct.pack(">I", 8) + ifd, "tiff") == (300, 200)
    core = b"BM" + bytes(12) + struct.pack("<IHH", 12, 640, 480) + bytes(8)
    assert raster_size(core, "bmp") == (640, 480)


@pytest.mark.parametrize("data,fmt", [
    (b"\x89PNG\r\n\x1a\n" + bytes(8), "png"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(4), "jpeg"),
    (b"\xff\xd8\xff\xda\x00\x08" + bytes(8), "jpeg"),
    (b"II*\x00" + struct.pack("<I", 10_000), "tiff"),
    (b"II*\x00" + struct.pack("<IH", 8, 60_000), "tiff"),
    (b"BM" + bytes(20), "bmp"),
])  # fmt: skip
def test_unreadable_headers_are_undecodable(data: bytes, fmt: str) -> None:
    with pytest.raises(UndecodableImage):
        raster_size(data, fmt)


def test_pixel_budget_is_refused_before_decoding() -> None:
    png = encode(".png", brain_slice())  # 64 x 64 = 4096 pixels
    assert decode_image(png, max_pixels=4096).size == (64, 64)
    with pytest.raises(ImageTooLarge):
        decode_image(png, max_pixels=4095)
    with pixel_budget(1000):
        with pytest.raises(ImageTooLarge):
            decode_image(png)
        assert decode_image(png, max_pixels=5000).size == (64, 64)  # explicit wins
    assert decode_image(png).size == (64, 64)  # the block's budget is gone
    # A 48 MP bomb is refused from its header quickly, well before any allocation.
    bomb = png_bomb(8000, 6000)
    assert len(bomb) < 200_000
    started = time.perf_counter()
    with pytest.raises(ImageTooLarge):
        decode_image(bomb)
    assert time.perf_counter() - started < 0.05
    with pytest.raises(ImageTooLarge):
        decode_image(png_declaring(2**31 - 1, 2**31 - 1))


def test_volume_budgets() -> None:
    gray = brain_slice()
    with pytest.raises(ImageTooLarge):  # a DICOM frame over the pixel budget
        decode_image(dicom(gray.astype(np.uint16)), max_pixels=1000)
    with pytest.raises(ImageTooLarge):  # a NIfTI slice plane over the pixel budget
        decode_image(nifti(np.zeros((64, 64, 3), np.int16)), max_pixels=1000)


def test_dicom_is_never_forced() -> None:
    raw = dicom(brain_slice().astype(np.uint16), preamble=False)
    import pydicom

    assert pydicom.dcmread(__import__("io").BytesIO(raw), force=True).Rows == 64  # parseable...
    with pytest.raises(UnsupportedMediaType):  # ...but not accepted without its preamble
        decode_image(raw)


def test_nifti_gz_is_inflated_only_as_far_as_its_header_says() -> None:
    vol = np.stack([brain_slice(seed=k).T.astype(np.int16) for k in range(5)], axis=2)
    plain = nifti(vol)
    # 64 MiB of trailing zeros after the declared data: never inflated.
    z = zlib_stream(plain, trailing=64 << 20)
    started = time.perf_counter()
    decoded = decode_image(z)
    assert time.perf_counter() - started < 1.0
    assert np.array_equal(decoded.pixels, decode_image(plain).pixels)
    with pytest.raises(UndecodableImage):  # less data than declared
        decode_image(gzip.compress(plain[:-100]))


def zlib_stream(data: bytes, trailing: int) -> bytes:
    import zlib

    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [z.compress(data)]
    zeros = bytes(1 << 20)
    parts += [z.compress(zeros) for _ in range(trailing >> 20)]
    return b"".join([*parts, z.flush()])


def test_max_image_pixels_setting(tiny_model_dir: Path) -> None:
    png = encode(".png", brain_slice())
    with _client(tiny_model_dir, max_image_pixels=4000) as client:
        body = assert_json_error(client.post("/predict", files={"file": ("a.png", png)}), 413)
        assert body["code"] == "image_too_large" and "64x64" in body["detail"]
        small = encode(".png", brain_slice(size=60))
        assert client.post("/predict", files={"file": ("a.png", small)}).status_code == 200


# --- timeouts ---------------------------------------------------------------------------


def test_request_timeout_is_a_503_json_and_the_service_recovers(tiny_model_dir: Path) -> None:
    png = encode(".png", brain_slice())
    # 9 MP: tens of ms to decode, far longer than the deadline (the tiny model's own
    # work on a 64x64 image can finish before the event loop checks a 1 us timer).
    big = encode(
        ".png",
        cv2.ellipse(
            np.zeros((3000, 3000), np.uint8), (1500, 1500), (1200, 1400), 0, 0, 360, 120, -1
        ),
    )
    with _client(tiny_model_dir, request_timeout_s=1e-3, max_concurrency=1) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        for path in ("/predict", "/explain"):
            res = client.post(path, files={"file": ("a.png", big)})
            assert_json_error(res, 503, "request_timeout")
            assert res.headers["retry-after"] == "1"
        # The work that had started finishes in the background; nothing stays stuck.
        runtime.settings.request_timeout_s = 30.0
        assert client.post("/predict", files={"file": ("a.png", png)}).status_code == 200
        assert client.get("/health").json()["status"] == "ok"


# --- API key ----------------------------------------------------------------------------


def test_api_key(tiny_model_dir: Path) -> None:
    png = encode(".png", brain_slice())
    key = "s3cret-κλειδί"  # non-ASCII on purpose: compared as bytes
    with _client(tiny_model_dir, api_key=key) as client:
        for path in ("/health", "/ready", "/v2/health/live", "/v2/health/ready"):
            assert client.get(path).status_code == 200, path
        good = {"X-API-Key": key.encode()}  # UTF-8 bytes on the wire
        wrong: list[dict[str, Any]] = [
            {},
            {"X-API-Key": "wrong"},
            {"X-API-Key": ""},
            {"X-API-Key": b"\xff\xfe"},  # not UTF-8
            {"X-API-Key": key.encode()[:-1]},  # a prefix of the key
        ]
        for headers in wrong:
            for method, path in (
                ("POST", "/predict"),
                ("POST", "/explain"),
                ("GET", "/metadata"),
                ("GET", "/metrics"),
                ("GET", "/v2"),
                ("GET", "/v2/models/tiny"),
            ):
                files = {"file": ("a.png", png)} if method == "POST" else None
                res = client.request(method, path, files=files, headers=headers)
                assert_json_error(res, 401, "unauthorized")
                assert res.headers["www-authenticate"] == "X-API-Key"
        res = client.post("/predict", files={"file": ("a.png", png)}, headers=good)
        assert res.status_code == 200, res.text
        assert client.get("/metadata", headers=good).status_code == 200
        # The key is never reflected: not in /metadata, not in errors.
        assert "s3cret" not in client.get("/metadata", headers=good).text

        schema = client.get("/openapi.json").json()
        assert schema["components"]["securitySchemes"]["APIKey"] == {
            "type": "apiKey",
            "in": "header",
            "name": "X-API-Key",
            "description": schema["components"]["securitySchemes"]["APIKey"]["description"],
        }
        assert schema["paths"]["/predict"]["post"]["security"] == [{"APIKey": []}]
        assert "401" in schema["paths"]["/explain"]["post"]["responses"]
        assert "security" not in schema["paths"]["/health"]["get"]


def test_no_api_key_by_default(service: TestClient) -> None:
    assert service.app.state.settings.api_key is None  # type: ignore[attr-defined]
    assert service.get("/metadata").status_code == 200


def test_api_key_is_secret_in_settings() -> None:
    settings = Settings(api_key="hunter2")
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.model_dump())


# --- headers and CORS -------------------------------------------------------------------


def test_security_headers_on_answers_and_errors(service: TestClient) -> None:
    png = encode(".png", brain_slice())
    for res in (
        service.post("/predict", files={"file": ("a.png", png)}),
        service.get("/health"),
        service.post("/predict", files={"file": ("a.png", b"\x89PNG\r\n\x1a\n" + bytes(3 << 20))}),
        service.get("/nope"),
    ):
        assert res.headers["x-content-type-options"] == "nosniff", res.status_code
        assert res.headers["cache-control"] == "no-store", res.status_code


def test_cors_only_for_configured_origins(tiny_model_dir: Path, service: TestClient) -> None:
    preflight = {"Access-Control-Request-Method": "POST"}
    res = service.options("/predict", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in res.headers
    with _client(tiny_model_dir, cors_origins="https://viewer.example") as client:
        ok = client.options("/predict", headers={"Origin": "https://viewer.example", **preflight})
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "https://viewer.example"
        bad = client.options("/predict", headers={"Origin": "https://evil.example", **preflight})
        assert bad.headers.get("access-control-allow-origin") != "https://evil.example"
        err = client.get("/nope", headers={"Origin": "https://viewer.example"})
        assert err.headers["access-control-allow-origin"] == "https://viewer.example"
