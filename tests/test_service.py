"""The HTTP service against a real exported model (the `tiny_model_dir` fixture).

Every upload format goes through /predict and /explain and is checked against
the contract functions called directly: `decode_image` -> `preprocess` ->
`OnnxModel.predict` / `OnnxModel.gradcam` -> `decide` / `compute_cam`.
"""

from __future__ import annotations

import base64
import gzip
import json
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from clients import ready_client
from fastapi.testclient import TestClient
from hostile_inputs import dicom, nifti
from prometheus_client.parser import text_string_to_metric_families

from braincam import DISCLAIMER
from braincam.cam import CLASSIFIER_METHODS, METHODS, compute_cam
from braincam.decision import decide
from braincam.decoding import decode_image
from braincam.explainers import PIXEL_METHODS
from braincam.inference import OnnxModel
from braincam.overlay import COLORMAPS, colorize
from braincam.preprocessing import preprocess
from service.core.config import Settings

MAX_UPLOAD_MB = 1.0  # small, so the 413 tests stay cheap
CPU = "CPUExecutionProvider"


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(tiny_model_dir: Path) -> Iterator[TestClient]:
    settings = Settings(
        model_dir=tiny_model_dir, providers=CPU, max_upload_mb=MAX_UPLOAD_MB, max_concurrency=4
    )
    with ready_client(settings) as client:
        yield client


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> OnnxModel:
    return OnnxModel(tiny_model_dir, providers=[CPU])


@pytest.fixture(scope="module")
def gray(demo_data: Path) -> np.ndarray:
    """One real demo slice (64x64 uint8 grayscale)."""
    path = sorted((demo_data / "Testing").glob("*/*.png"))[0]
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None and img.dtype == np.uint8 and img.ndim == 2
    return img


@dataclass
class Sample:
    data: bytes
    fmt: str
    form: dict[str, str] = field(default_factory=dict)  # e.g. {"slice": "1"}

    @property
    def slice_index(self) -> int | None:
        return int(self.form["slice"]) if "slice" in self.form else None


def _encode(ext: str, img: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, img, params or [])
    assert ok, ext
    return buf.tobytes()


@pytest.fixture(scope="module")
def samples(gray: np.ndarray) -> dict[str, Sample]:
    """The same slice in every accepted format, at assorted sizes and depths."""
    rgb = cv2.resize(cv2.applyColorMap(gray, cv2.COLORMAP_BONE), (80, 72))  # BGR, W=80 H=72
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])
    deep = gray.astype(np.uint16) * 257 + 3  # 16 bit, full range
    raw12 = (gray.astype(np.uint16) * 16).astype(np.uint16)  # 12-bit scanner values
    frames = np.stack([raw12, np.flipud(raw12), np.fliplr(raw12)])
    volume = np.stack([gray.T.astype(np.int16) * (k + 1) for k in range(5)], axis=2)
    nii = nifti(volume)
    return {
        "png8": Sample(_encode(".png", gray), "png"),
        "png16": Sample(_encode(".png", deep), "png"),
        "png_rgb": Sample(_encode(".png", rgb), "png"),
        "png_rgba": Sample(_encode(".png", rgba), "png"),
        "jpeg": Sample(
            _encode(".jpg", cv2.resize(gray, (96, 90)), [cv2.IMWRITE_JPEG_QUALITY, 95]), "jpeg"
        ),
        "bmp": Sample(_encode(".bmp", rgb), "bmp"),
        "tiff": Sample(_encode(".tiff", gray), "tiff"),
        "tiff16": Sample(_encode(".tiff", deep), "tiff"),
        "dicom": Sample(dicom(raw12, rescale=(2.0, -100.0), window=(2000.0, 3800.0)), "dicom"),
        "dicom_multiframe": Sample(
            dicom(frames, rescale=(1.5, 10.0), window=(1500.0, 3000.0)), "dicom", {"slice": "2"}
        ),
        "dicom_multiframe_default": Sample(
            dicom(frames, rescale=(1.0, 0.0), window=(2048.0, 4096.0)), "dicom"
        ),
        "nifti": Sample(nii, "nifti", {"slice": "3"}),
        "nifti_gz": Sample(gzip.compress(nii), "nifti"),
    }


FORMATS = [
    "png8", "png16", "png_rgb", "png_rgba", "jpeg", "bmp", "tiff", "tiff16",
    "dicom", "dicom_multiframe", "dicom_multiframe_default", "nifti", "nifti_gz",
]  # fmt: skip


def _post(client: TestClient, path: str, sample: Sample, **form: str) -> Any:
    # A misleading file name and content type: the type must come from the bytes.
    files = {"file": ("upload.bin", sample.data, "application/octet-stream")}
    if path == "/explain":  # every picture, unless a test asks for fewer
        form = {"images": "all", **form}
    return client.post(path, files=files, data={**sample.form, **form})


def _png(b64: str) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_UNCHANGED)
    assert img is not None
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _expected(model: OnnxModel, sample: Sample) -> tuple[Any, np.ndarray, Any]:
    decoded = decode_image(sample.data, sample.slice_index)
    x = preprocess(decoded.pixels, model.spec.preprocessing)[None]
    return decoded, x, decide(model.predict(x)[0], model.spec)


def _assert_error(res: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert res.status_code == status, res.text
    assert res.headers["content-type"].startswith("application/json")
    body = res.json()
    assert set(body) == {"detail", "code"}, body
    assert isinstance(body["detail"], str) and body["detail"]
    if code is not None:
        assert body["code"] == code, body
    # Nothing internal leaks: no traceback, no server path.
    assert "Traceback" not in body["detail"] and "/tmp" not in body["detail"], body
    return body


# --- /predict -------------------------------------------------------------------------


@pytest.mark.parametrize("name", FORMATS)
def test_predict_every_format_equals_the_model_on_the_same_tensor(
    service: TestClient, model: OnnxModel, samples: dict[str, Sample], name: str
) -> None:
    sample = samples[name]
    res = _post(service, "/predict", sample)
    assert res.status_code == 200, res.text
    body = res.json()
    decoded, _, decision = _expected(model, sample)
    # Exactly what OnnxModel.predict gives on the preprocessed tensor.
    assert body["probabilities"] == decision.probabilities
    assert body["label"] == decision.label
    assert body["class_index"] == decision.class_index
    assert body["confidence"] == decision.confidence
    assert body["model"] == {
        "name": model.spec.name, "version": model.spec.version, "notice": model.spec.notice
    }
    width, height = decoded.size
    assert body["input"] == {
        "format": sample.fmt,
        "width": width,
        "height": height,
        "bit_depth": decoded.bit_depth,
        "slice": decoded.slice_index,
        "n_slices": decoded.n_slices,
    }
    assert set(body["timing_ms"]) == {"decode", "preprocess", "inference", "total"}
    assert all(v >= 0 for v in body["timing_ms"].values())
    assert body["timing_ms"]["total"] >= body["timing_ms"]["inference"]


def test_input_details(service: TestClient, samples: dict[str, Sample]) -> None:
    def info(name: str) -> dict[str, Any]:
        res = _post(service, "/predict", samples[name])
        assert res.status_code == 200, res.text
        return dict(res.json()["input"])

    assert info("png16")["bit_depth"] == 16
    assert info("png_rgba")["width"] == 80 and info("png_rgba")["height"] == 72
    assert info("dicom_multiframe")["slice"] == 2 and info("dicom_multiframe")["n_slices"] == 3
    assert info("dicom_multiframe_default")["slice"] == 1  # the middle frame
    assert info("nifti")["slice"] == 3 and info("nifti")["n_slices"] == 5
    assert info("nifti_gz")["slice"] == 2


# --- /explain -------------------------------------------------------------------------


@pytest.mark.parametrize("name", FORMATS)
def test_explain_every_format(
    service: TestClient, model: OnnxModel, samples: dict[str, Sample], name: str
) -> None:
    sample = samples[name]
    res = _post(service, "/explain", sample)
    assert res.status_code == 200, res.text
    body = res.json()
    decoded, x, decision = _expected(model, sample)
    width, height = decoded.size

    # The prediction comes from the gradcam graph: the classifier's up to float noise.
    assert body["label"] == decision.label and body["class_index"] == decision.class_index
    for label, p in decision.probabilities.items():
        assert body["probabilities"][label] == pytest.approx(p, abs=1e-5)
    assert body["target"] == {"class_index": decision.class_index, "label": decision.label}
    assert body["method"] == "gradcam" and body["colormap"] == "jet" and body["alpha"] == 0.4
    assert body["layer"] == model.spec.explanation.layer
    assert body["gradcam_runs"] == 1 and body["smooth"] is False
    assert set(body["timing_ms"]) == {"decode", "preprocess", "inference", "cam", "encode", "total"}

    # Every picture at the uploaded image's own size.
    overlay, heat, panel = (_png(body[k]) for k in ("overlay_png", "heatmap_png", "panels_png"))
    assert overlay.shape == heat.shape == (height, width, 3)
    assert panel.shape[0] > height and panel.shape[1] >= 3 * width and panel.shape[2] == 3

    # The heatmap is the CAM of the raw gradcam run, coloured (PNG is lossless).
    out = model.gradcam(x)
    cam = compute_cam("gradcam", out.activations, out.gradients, size=(width, height))[0]
    expected = colorize(cam, "jet")
    assert np.abs(heat.astype(int) - expected.astype(int)).max() <= 2


@pytest.mark.parametrize("method", list(METHODS))
def test_explain_every_method(service: TestClient, samples: dict[str, Sample], method: str) -> None:
    res = _post(service, "/explain", samples["png_rgb"], method=method.upper())
    assert res.status_code == 200, res.text
    assert res.json()["method"] == method
    assert _png(res.json()["heatmap_png"]).shape == (72, 80, 3)


def test_explain_target_by_label_or_index(
    service: TestClient, model: OnnxModel, samples: dict[str, Sample]
) -> None:
    labels = model.spec.labels
    predicted = _post(service, "/explain", samples["png8"]).json()
    other = (predicted["class_index"] + 1) % len(labels)
    by_label = _post(service, "/explain", samples["png8"], target=labels[other]).json()
    by_index = _post(service, "/explain", samples["png8"], target=str(other)).json()
    by_case = _post(service, "/explain", samples["png8"], target=labels[other].upper()).json()
    for body in (by_label, by_index, by_case):
        assert body["target"] == {"class_index": other, "label": labels[other]}
        # The decision does not change with the explained class.
        assert body["label"] == predicted["label"]
        assert body["gradcam_runs"] == 1
    assert by_label["heatmap_png"] == by_index["heatmap_png"] == by_case["heatmap_png"]
    assert by_label["heatmap_png"] != predicted["heatmap_png"]


def test_explain_options(service: TestClient, samples: dict[str, Sample]) -> None:
    base = _post(service, "/explain", samples["png_rgb"]).json()
    viridis = _post(service, "/explain", samples["png_rgb"], colormap="Viridis").json()
    assert viridis["colormap"] == "viridis" and viridis["heatmap_png"] != base["heatmap_png"]
    opaque = _post(service, "/explain", samples["png_rgb"], alpha="1").json()
    assert opaque["alpha"] == 1.0
    # alpha 1: the overlay is the heatmap itself.
    assert np.array_equal(_png(opaque["overlay_png"]), _png(opaque["heatmap_png"]))
    clear = _post(service, "/explain", samples["png_rgb"], alpha="0").json()
    assert np.array_equal(
        _png(clear["overlay_png"]),
        cv2.cvtColor(
            cv2.imdecode(np.frombuffer(samples["png_rgb"].data, np.uint8), cv2.IMREAD_COLOR),
            cv2.COLOR_BGR2RGB,
        ),
    )


def test_explain_smooth_runs_one_batch_of_two(
    service: TestClient,
    model: OnnxModel,
    samples: dict[str, Sample],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sample = samples["png8"]
    runtime_model = service.app.state.runtime.model  # type: ignore[attr-defined]
    batches: list[int] = []
    original = runtime_model.gradcam

    def spy(batch: np.ndarray, targets: Any = None) -> Any:
        batches.append(int(batch.shape[0]))
        return original(batch, targets)

    monkeypatch.setattr(runtime_model, "gradcam", spy)
    res = _post(service, "/explain", sample, smooth="true", target="0")
    assert res.status_code == 200, res.text
    assert res.json()["smooth"] is True and res.json()["gradcam_runs"] == 1
    assert batches == [2]

    # The same map as averaging the two CAMs by hand.
    from braincam.cam import flip_smoothed

    decoded, x, _ = _expected(model, sample)
    out = model.gradcam(np.concatenate([x, x[:, :, ::-1, :]]), [0, 0])
    cams = compute_cam("gradcam", out.activations, out.gradients, size=decoded.size)
    expected = colorize(flip_smoothed(cams[0], cams[1]), "jet")
    heat = _png(res.json()["heatmap_png"])
    assert np.abs(heat.astype(int) - expected.astype(int)).max() <= 2


# --- bad input: JSON errors, never a 500 ------------------------------------------------


def test_upload_over_the_limit_is_413(service: TestClient) -> None:
    limit = int(MAX_UPLOAD_MB * 2**20)
    png_head = b"\x89PNG\r\n\x1a\n"
    # Far over: refused on Content-Length, before the body is read.
    _assert_error(
        _post(service, "/predict", Sample(png_head + bytes(3 * limit), "png")),
        413,
        "payload_too_large",
    )
    # Just over: the body fits the multipart allowance, the file read stops at the limit.
    _assert_error(
        _post(service, "/explain", Sample(png_head + bytes(limit), "png")), 413, "payload_too_large"
    )


def test_streamed_body_over_the_limit_is_413(service: TestClient) -> None:
    """No Content-Length (chunked upload): the body is counted as it streams in."""
    boundary = "braincamtest"

    def body() -> Iterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        for _ in range(4):
            yield bytes(2**19)
        yield f"\r\n--{boundary}--\r\n".encode()

    res = service.post(
        "/predict",
        content=body(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    _assert_error(res, 413, "payload_too_large")


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"just some text, not an image\n" * 10, 415, "unsupported_media_type"),
        (
            b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n",
            415,
            "unsupported_media_type",
        ),
        (gzip.compress(b"not a nifti volume" * 50), 415, "unsupported_media_type"),
        (b"", 422, "undecodable_image"),
    ],
    ids=["text", "pdf", "gzip-not-nifti", "empty"],
)
def test_unsupported_or_empty_files(
    service: TestClient, data: bytes, status: int, code: str
) -> None:
    for path in ("/predict", "/explain"):
        _assert_error(_post(service, path, Sample(data, "?")), status, code)


def test_truncated_files_are_422(service: TestClient, samples: dict[str, Sample]) -> None:
    for name in ("png8", "jpeg", "tiff", "dicom", "nifti"):
        data = samples[name].data
        truncated = Sample(data[: len(data) // 2], "?")
        for path in ("/predict", "/explain"):
            res = _post(service, path, truncated)
            _assert_error(res, 422)


def test_explain_encodes_only_the_images_asked_for(
    service: TestClient, samples: dict[str, Sample]
) -> None:
    sample = samples["png_rgb"]
    full = _post(service, "/explain", sample).json()
    default = service.post("/explain", files={"file": ("x.png", sample.data)}).json()
    assert default["overlay_png"] == full["overlay_png"]
    assert default["heatmap_png"] is None and default["panels_png"] is None
    for images, present in [
        ("heatmap", {"heatmap_png"}),
        (" Panels , overlay", {"panels_png", "overlay_png"}),
        ("", {"overlay_png"}),
    ]:
        body = _post(service, "/explain", sample, images=images).json()
        for key in ("overlay_png", "heatmap_png", "panels_png"):
            assert body[key] == (full[key] if key in present else None), (images, key)


@pytest.mark.parametrize(
    ("form", "code"),
    [
        ({"target": "banana"}, "invalid_parameter"),
        ({"target": "99"}, "invalid_parameter"),
        ({"target": "-1"}, "invalid_parameter"),
        ({"method": "deepdream"}, "invalid_parameter"),
        ({"alpha": "1.5"}, "validation_error"),
        ({"alpha": "-0.1"}, "validation_error"),
        ({"alpha": "opaque"}, "validation_error"),
        ({"alpha": "nan"}, "validation_error"),
        ({"colormap": "sepia"}, "invalid_parameter"),
        ({"slice": "-1"}, "validation_error"),
        ({"slice": "two"}, "validation_error"),
        ({"slice": "0"}, "invalid_parameter"),  # a PNG has no slices
        ({"smooth": "perhaps"}, "validation_error"),
        ({"images": "overlay,thumbnail"}, "invalid_parameter"),
    ],
)
def test_bad_parameters_are_422(
    service: TestClient, samples: dict[str, Sample], form: dict[str, str], code: str
) -> None:
    body = _assert_error(_post(service, "/explain", samples["png8"], **form), 422, code)
    assert next(iter(form)) in body["detail"]


def test_bad_slice_of_a_volume_is_422(service: TestClient, samples: dict[str, Sample]) -> None:
    for name, bad in (("nifti", "5"), ("dicom_multiframe", "3"), ("dicom", "1")):
        sample = Sample(samples[name].data, "?", {"slice": bad})
        for path in ("/predict", "/explain"):
            _assert_error(_post(service, path, sample), 422, "invalid_parameter")


def test_missing_file_field_is_422(service: TestClient) -> None:
    for path in ("/predict", "/explain"):
        body = _assert_error(service.post(path, data={"slice": "1"}), 422, "validation_error")
        assert "file" in body["detail"]
        # A text field named `file` is not a file either.
        _assert_error(service.post(path, data={"file": "abc"}), 422, "validation_error")
        # Nor a JSON body.
        _assert_error(service.post(path, json={"file": "abc"}), 422, "validation_error")


def test_malformed_multipart_is_400_json(service: TestClient) -> None:
    res = service.post(
        "/predict",
        content=b'--x\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc',
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert res.status_code in (400, 422), res.text
    _assert_error(res, res.status_code)


def test_unknown_routes_and_methods_are_json(service: TestClient) -> None:
    _assert_error(service.get("/nope"), 404, "not_found")
    _assert_error(service.get("/predict"), 405, "method_not_allowed")


def test_damaged_dicom_header_is_422(service: TestClient, samples: dict[str, Sample]) -> None:
    """An element pydicom only parses when it is read (a bad VR on WindowWidth)."""
    data = samples["dicom"].data
    tag = b"\x28\x00\x51\x10DS"  # (0028,1051) Window Width, explicit VR little endian
    assert tag in data
    damaged = Sample(data.replace(tag, b"\x28\x00\x51\x10D+"), "?")
    for path in ("/predict", "/explain"):
        _assert_error(_post(service, path, damaged), 422, "undecodable_image")


def test_corrupted_files_never_500(service: TestClient, samples: dict[str, Sample]) -> None:
    """Random damage to every format (truncation, overwritten bytes in the header and
    anywhere): a clean 200, 413 (a damaged size field), 415 or 422, never a 500, and the
    service keeps answering."""
    rng = random.Random(0)
    for name in FORMATS:
        data = bytearray(samples[name].data)
        for trial in range(16):
            damaged = bytearray(data)
            if trial % 4 == 1:
                damaged = damaged[: rng.randrange(8, len(damaged))]
            # Headers hold the parsing decisions: damage them most.
            span = min(len(damaged), 512) if trial % 2 else len(damaged)
            for _ in range(rng.randrange(1, 24)):
                damaged[rng.randrange(0, span)] = rng.randrange(256)
            sample = Sample(bytes(damaged), "?", samples[name].form)
            path = "/explain" if trial % 3 == 0 else "/predict"
            res = _post(service, path, sample)
            assert res.status_code in (200, 413, 415, 422), (name, trial, path, res.text)
            if res.status_code != 200:
                _assert_error(res, res.status_code)
    assert _post(service, "/predict", samples["png8"]).status_code == 200


# --- concurrency ----------------------------------------------------------------------


def test_parallel_requests_agree_with_a_single_request(
    service: TestClient, samples: dict[str, Sample]
) -> None:
    names = ["png8", "png_rgb", "dicom_multiframe", "nifti_gz"]
    single = {
        (path, name): _post(service, path, samples[name]).json()
        for path in ("/predict", "/explain")
        for name in names
    }
    jobs = [(path, names[i % len(names)]) for i in range(32) for path in ("/predict", "/explain")][
        :32
    ]

    def call(job: tuple[str, str]) -> tuple[tuple[str, str], int, dict[str, Any]]:
        res = _post(service, job[0], samples[job[1]])
        return job, res.status_code, res.json()

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, jobs))
    assert len(results) == 32
    for job, status, body in results:
        assert status == 200, body
        expected = single[job]
        assert body["probabilities"] == expected["probabilities"]
        assert body["label"] == expected["label"]
        if job[0] == "/explain":
            assert body["heatmap_png"] == expected["heatmap_png"]
            assert body["overlay_png"] == expected["overlay_png"]


# --- health, metadata, metrics, aliases -----------------------------------------------


def test_health_and_ready(service: TestClient, model: OnnxModel) -> None:
    health = service.get("/health")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and body["ready"] is True and body["error"] is None
    assert body["model"] == {
        "name": model.spec.name, "version": model.spec.version, "notice": model.spec.notice
    }
    assert body["providers"] == [CPU]
    assert body["execution_providers"]["requested"] == [CPU]
    assert body["execution_providers"]["active"] == [CPU]
    assert CPU in body["execution_providers"]["available"]
    assert body["gpu"] is False and body["warnings"] == []
    assert body["load_seconds"] > 0
    ready = service.get("/ready")
    assert ready.status_code == 200 and ready.json() == {"ready": True, "status": "ok"}


def test_open_inference_protocol_aliases(service: TestClient, model: OnnxModel) -> None:
    assert service.get("/v2/health/live").json() == {"live": True}
    assert service.get("/v2/health/ready").status_code == 200
    assert service.get("/v2").json()["name"] == "braincam"
    res = service.get(f"/v2/models/{model.spec.name}")
    assert res.status_code == 200
    meta = res.json()
    h, w, c = model.spec.input_shape
    assert meta["name"] == model.spec.name and meta["versions"] == [model.spec.version]
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, h, w, c]}]
    assert meta["outputs"][0]["shape"] == [-1, len(model.spec.labels)]
    assert service.get(f"/v2/models/{model.spec.name}/ready").status_code == 200
    _assert_error(service.get("/v2/models/someone-else"), 404, "model_not_found")
    _assert_error(service.get("/v2/models/someone-else/ready"), 404, "model_not_found")


def test_metadata(service: TestClient, tiny_model_dir: Path) -> None:
    res = service.get("/metadata")
    assert res.status_code == 200
    body = res.json()
    assert body["model"] == json.loads((tiny_model_dir / "model.json").read_text())
    assert body["cam_methods"] == list(METHODS)
    assert body["colormaps"] == list(COLORMAPS)
    assert body["defaults"] == {"method": "gradcam", "alpha": 0.4, "colormap": "jet"}
    assert body["limits"]["max_upload_bytes"] == int(MAX_UPLOAD_MB * 2**20)
    assert body["limits"]["max_concurrency"] == 4
    assert {"png", "jpeg", "bmp", "tiff", "dicom", "nifti"} <= set(body["limits"]["formats"])
    assert body["providers"]["active"] == [CPU] and body["gpu"] is False
    assert body["disclaimer"] == DISCLAIMER


def test_openapi_documents_disclaimer_and_errors(service: TestClient) -> None:
    spec = service.get("/openapi.json").json()
    assert DISCLAIMER in spec["info"]["description"]
    for path in ("/predict", "/explain"):
        responses = spec["paths"][path]["post"]["responses"]
        for status in ("200", "413", "415", "422", "503"):
            assert status in responses, (path, status)
        assert responses["415"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/ErrorResponse"
        )
    form = spec["components"]["schemas"]
    explain_form = next(v for k, v in form.items() if k.startswith("Body_explain"))
    assert set(explain_form["properties"]) >= {
        "file",
        "slice",
        "target",
        "method",
        "alpha",
        "colormap",
        "smooth",
    }
    assert explain_form["properties"]["method"]["enum"] == [
        *METHODS, *CLASSIFIER_METHODS, *PIXEL_METHODS
    ]
    assert {"layer", "samples"} <= set(explain_form["properties"])
    assert service.get("/docs").status_code == 200


def _samples_of(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def test_metrics(service: TestClient, samples: dict[str, Sample]) -> None:
    _post(service, "/predict", samples["png8"])
    _post(service, "/explain", samples["png8"])
    _post(service, "/predict", Sample(b"plain text" * 10, "?"))
    res = service.get("/metrics")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
    values = _samples_of(res.text)

    def value(name: str, **labels: str) -> float:
        return values.get((name, frozenset(labels.items())), 0.0)

    assert value("braincam_requests_total", endpoint="/predict", method="POST", status="200") >= 1
    assert value("braincam_requests_total", endpoint="/explain", method="POST", status="200") >= 1
    assert value("braincam_requests_total", endpoint="/predict", method="POST", status="415") >= 1
    assert value("braincam_request_duration_seconds_count", endpoint="/predict") >= 2
    assert value("braincam_inference_duration_seconds_count", graph="classifier") >= 1
    assert value("braincam_inference_duration_seconds_count", graph="gradcam") >= 1
    assert value("braincam_errors_total", status="415", code="unsupported_media_type") >= 1
    assert value("braincam_upload_bytes_count") >= 2
    assert value("braincam_model_ready") == 1
    assert value("braincam_inference_in_progress") == 0
    # Unknown paths share one label: no unbounded label values from scanners.
    service.get("/wp-login.php")
    values = _samples_of(service.get("/metrics").text)
    assert value("braincam_requests_total", endpoint="unmatched", method="GET", status="404") >= 1
    assert not any("wp-login" in str(key) for key in values)
