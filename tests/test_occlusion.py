"""Occlusion sensitivity: maps from the classifier alone, and the service for a model
directory without a Grad-CAM graph.

The constructed model's score is the mean of one image quadrant, so the only pixels
whose occlusion changes its output are that quadrant's: a correct map lights it and
nothing else."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from clients import ready_client
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper

from braincam.cam import CLASSIFIER_METHODS, METHODS, available_methods
from braincam.inference import OnnxModel
from braincam.model_spec import (
    CLASSIFIER_ONNX,
    GRADCAM_ONNX,
    MODEL_JSON,
    Explanation,
    GraphFile,
    Graphs,
    ModelSpec,
    load_spec,
    save_spec,
    sha256_file,
)
from braincam.occlusion import OcclusionGrid, OcclusionSensitivity, occlusion_drops
from braincam.preprocessing import Preprocessing
from service.core.config import Settings

CPU = "CPUExecutionProvider"
SIZE = 32


def _quadrant_classifier(size: int, quadrant: tuple[slice, slice], scale: float = 8.0) -> bytes:
    """image [N,size,size,1] -> softmax([scale * mean(image[quadrant]), 0])."""
    mask = np.zeros((1, size, size, 1), dtype=np.float32)
    mask[0, quadrant[0], quadrant[1], 0] = 1.0
    mask /= mask.sum()
    nodes = [
        helper.make_node("Mul", ["image", "mask"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axes"], ["score"], keepdims=1),  # [N,1,1,1]
        helper.make_node("Reshape", ["score", "shape"], ["score2"]),  # [N,1]
        helper.make_node("MatMul", ["score2", "spread"], ["logits"]),  # [N,2]
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    inits = [
        numpy_helper.from_array(mask, "mask"),
        numpy_helper.from_array(np.array([1, 2, 3], dtype=np.int64), "axes"),
        numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), "shape"),
        numpy_helper.from_array(np.array([[scale, 0.0]], dtype=np.float32), "spread"),
    ]
    graph = helper.make_graph(
        nodes,
        "quadrant",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", size, size, 1])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _graph_file(path: Path, inputs: dict, outputs: dict) -> GraphFile:  # type: ignore[type-arg]
    return GraphFile(
        file=path.name,
        sha256=sha256_file(path),
        size_bytes=path.stat().st_size,
        inputs=inputs,
        outputs=outputs,
    )


@pytest.fixture(scope="module")
def quadrant_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory with classifier.onnx only: the score looks at the top-left."""
    out = tmp_path_factory.mktemp("quadrant")
    half = slice(0, SIZE // 2)
    (out / CLASSIFIER_ONNX).write_bytes(_quadrant_classifier(SIZE, (half, half)))
    spec = ModelSpec(
        name="quadrant",
        labels=["lesion", "none"],
        preprocessing=Preprocessing(height=SIZE, width=SIZE, channels=1, scale="unit"),
        explanation=Explanation(layer="image", activation_shape=[SIZE, SIZE, 1]),
        graphs=Graphs(
            classifier=_graph_file(
                out / CLASSIFIER_ONNX,
                {"image": [None, SIZE, SIZE, 1]},
                {"probabilities": [None, 2]},
            )
        ),
        opset=17,
    )
    save_spec(spec, out)
    return out


def _session_predict(model_bytes: bytes):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    sess = ort.InferenceSession(model_bytes, providers=[CPU])
    return lambda x: sess.run(None, {"image": x})[0]


# --- the method ------------------------------------------------------------------------


def test_grid_covers_every_pixel() -> None:
    grid = OcclusionGrid.for_input(150, 150)
    assert grid.patch == (19, 19) and grid.stride == (9, 9)
    windows = grid.windows(150, 150)
    covered = np.zeros((150, 150), dtype=int)
    for y, x in windows:
        covered[y : y + 19, x : x + 19] += 1
    assert covered.min() >= 1
    assert max(y for y, _ in windows) == 150 - 19  # flush with the far edge
    assert OcclusionGrid.for_input(8, 12).patch == (1, 2)


@pytest.mark.parametrize("corner", ["top_left", "bottom_right"])
def test_map_lights_the_quadrant_the_model_reads(corner: str) -> None:
    half = SIZE // 2
    quadrant = (
        (slice(0, half), slice(0, half))
        if corner == "top_left"
        else (slice(half, SIZE), slice(half, SIZE))
    )
    predict = _session_predict(_quadrant_classifier(SIZE, quadrant))
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (3, SIZE, SIZE, 1)).astype(np.float32)
    images[:, quadrant[0], quadrant[1]] += 1.0  # the quadrant is brighter than the mean
    targets = np.zeros(3, dtype=np.int64)
    drops = occlusion_drops(predict, images, targets, batch_size=7)  # ragged last batch
    inside = np.zeros((SIZE, SIZE), dtype=bool)
    inside[quadrant] = True
    # The patch reaches 2 px past the quadrant: only windows overlapping it change p.
    reach = cv2.dilate(inside.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    assert (drops[:, inside] > 0).mean() > 0.95
    np.testing.assert_allclose(drops[:, ~reach], 0.0, atol=1e-6)
    maps = OcclusionSensitivity()(predict, images, targets, size=(64, 64))
    assert maps.shape == (3, 64, 64) and maps.min() >= 0 and maps.max() == 1.0
    big = cv2.resize(inside.astype(np.uint8), (64, 64), interpolation=cv2.INTER_NEAREST) > 0
    for m in maps:
        assert m[big].sum() / m.sum() > 0.9  # energy in the read quadrant
        assert big[np.unravel_index(m.argmax(), m.shape)]


def test_drops_are_the_probability_drops_of_single_windows() -> None:
    # Against a direct, one-window-at-a-time computation.
    predict = _session_predict(_quadrant_classifier(16, (slice(0, 8), slice(0, 8))))
    image = np.random.default_rng(1).uniform(0, 1, (1, 16, 16, 1)).astype(np.float32)
    grid = OcclusionGrid.for_input(16, 16)
    (ph, pw) = grid.patch
    base = predict(image)[0, 1]
    total = np.zeros((16, 16))
    count = np.zeros((16, 16))
    for y, x in grid.windows(16, 16):
        occluded = image.copy()
        occluded[0, y : y + ph, x : x + pw] = image.mean()
        total[y : y + ph, x : x + pw] += base - predict(occluded)[0, 1]
        count[y : y + ph, x : x + pw] += 1
    got = occlusion_drops(predict, image, np.array([1]))
    np.testing.assert_allclose(got[0], total / count, atol=1e-6)


def test_available_methods() -> None:
    assert available_methods(gradient_graph=True) == list(METHODS)
    assert available_methods(gradient_graph=True, classifier_methods=True) == [
        *METHODS,
        *CLASSIFIER_METHODS,
    ]
    assert available_methods(gradient_graph=False) == ["occlusion"]


# --- a model directory without gradcam.onnx ---------------------------------------------


def _png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def _lesion_png(size: int = 96) -> bytes:
    rng = np.random.default_rng(2)
    img = rng.integers(0, 100, (size, size), dtype=np.uint8)
    img[: size // 2, : size // 2] += 120  # bright top-left: what the model reads
    return _png(img)


@pytest.fixture(scope="module")
def no_gradcam_client(quadrant_dir: Path) -> Iterator[TestClient]:
    with ready_client(Settings(model_dir=quadrant_dir, providers=CPU)) as client:
        yield client


def test_model_without_gradcam_loads(quadrant_dir: Path) -> None:
    spec = load_spec(quadrant_dir)
    assert spec.graphs.gradcam is None
    assert [f.file for f in spec.graphs.files()] == [CLASSIFIER_ONNX]
    model = OnnxModel(quadrant_dir, providers=[CPU])
    assert not model.has_gradcam
    model.warmup()
    with pytest.raises(RuntimeError, match="no Grad-CAM graph"):
        model.gradcam(np.zeros((1, SIZE, SIZE, 1), dtype=np.float32))


def test_no_gradcam_model_serves_predict_and_occlusion(no_gradcam_client: TestClient) -> None:
    client = no_gradcam_client
    meta = client.get("/metadata").json()
    assert meta["cam_methods"] == ["occlusion"]
    assert meta["defaults"]["method"] == "occlusion"
    files = {"file": ("x.png", _lesion_png(), "image/png")}
    pred = client.post("/predict", files=files)
    assert pred.status_code == 200, pred.text
    assert pred.json()["label"] == "lesion"
    res = client.post("/explain", files=files, data={"method": "occlusion", "images": "all"})
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["method"] == "occlusion" and body["layer"] == "image"
    assert body["gradcam_runs"] == 0
    assert body["probabilities"] == pred.json()["probabilities"]
    heat = cv2.imdecode(np.frombuffer(base64.b64decode(body["heatmap_png"]), np.uint8), 1)
    assert heat.shape == (96, 96, 3)
    # jet: hot is red. The read quadrant is the hottest one.
    red = heat[..., 2].astype(float) - heat[..., 0].astype(float)
    quads = [red[:48, :48], red[:48, 48:], red[48:, :48], red[48:, 48:]]
    assert int(np.argmax([q.mean() for q in quads])) == 0
    smooth = client.post("/explain", files=files, data={"method": "occlusion", "smooth": "true"})
    assert smooth.status_code == 200, smooth.text
    metrics = client.get("/metrics").text
    assert 'braincam_inference_duration_seconds_count{graph="occlusion"} 2.0' in metrics


def test_no_gradcam_model_defaults_to_occlusion(no_gradcam_client: TestClient) -> None:
    files = {"file": ("x.png", _lesion_png(), "image/png")}
    res = no_gradcam_client.post("/explain", files=files)  # no method named
    assert res.status_code == 200, res.text
    assert res.json()["method"] == "occlusion"


def test_no_gradcam_model_series(no_gradcam_client: TestClient) -> None:
    from tests.dicom_series import mr_series

    rng = np.random.default_rng(3)
    slices = []
    for bright in (0, 120, 60):  # the middle slice's top-left is brightest: it decides
        img = rng.integers(0, 100, (96, 96), dtype=np.uint8)
        img[:48, :48] += np.uint8(bright)
        slices.append(img)
    files = [("files", (n, d, "application/dicom")) for n, d in mr_series(slices).files]
    res = no_gradcam_client.post("/explain/series", files=files)
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["method"] == "occlusion" and body["deciding_slice"] == 1
    overlay = cv2.imdecode(np.frombuffer(base64.b64decode(body["overlay_png"]), np.uint8), 1)
    assert overlay.shape == (96, 96, 3)
    gradcam = no_gradcam_client.post("/explain/series", files=files, data={"method": "gradcam"})
    assert gradcam.status_code == 422 and gradcam.json()["code"] == "method_unavailable"
    dicom = no_gradcam_client.post("/predict/series", files=files, data={"output": "dicom"})
    assert dicom.status_code == 200, dicom.text
    assert {o["kind"] for o in dicom.json()["dicom"]} >= {"sr"}


@pytest.mark.parametrize("method", ["gradcam", "eigencam"])
def test_no_gradcam_model_refuses_gradient_methods(
    no_gradcam_client: TestClient, method: str
) -> None:
    files = {"file": ("x.png", _lesion_png(), "image/png")}
    res = no_gradcam_client.post("/explain", files=files, data={"method": method})
    assert res.status_code == 422
    body = res.json()
    assert body["code"] == "method_unavailable"
    assert "occlusion" in body["detail"] and "Grad-CAM graph" in body["detail"]


def test_no_gradcam_model_open_inference_protocol(no_gradcam_client: TestClient) -> None:
    assert no_gradcam_client.get("/v2/models/quadrant").status_code == 200
    assert no_gradcam_client.get("/v2/models/quadrant-gradcam").status_code == 404


def test_gradcam_file_removed_from_an_exported_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    # An exported directory whose model.json drops the Grad-CAM graph serves by occlusion.
    out = tmp_path / "nogradcam"
    shutil.copytree(tiny_model_dir, out)
    (out / GRADCAM_ONNX).unlink()
    raw = json.loads((out / MODEL_JSON).read_text())
    del raw["graphs"]["gradcam"]
    (out / MODEL_JSON).write_text(json.dumps(raw))
    model = OnnxModel(out, providers=[CPU])
    assert not model.has_gradcam
    x = np.random.default_rng(0).uniform(0, 1, (1, *model.spec.input_shape)).astype(np.float32)
    maps = OcclusionSensitivity()(model.predict, x, np.array([0]))
    assert maps.shape == (1, *model.spec.input_shape[:2])


# --- a model with a Grad-CAM graph: occlusion on request ----------------------------------


@pytest.mark.parametrize("enabled", [False, True])
def test_occlusion_on_request(tiny_model_dir: Path, demo_data: Path, enabled: bool) -> None:
    settings = Settings(model_dir=tiny_model_dir, providers=CPU, occlusion=enabled)
    image = sorted((demo_data / "Testing").glob("glioma/*.png"))[0].read_bytes()
    files = {"file": ("g.png", image, "image/png")}
    with ready_client(settings) as client:
        methods = client.get("/metadata").json()["cam_methods"]
        assert ("occlusion" in methods) is enabled
        assert set(METHODS) <= set(methods)
        res = client.post("/explain", files=files, data={"method": "occlusion"})
        if enabled:
            assert res.status_code == 200, res.text
            body = res.json()
            assert body["method"] == "occlusion" and body["overlay_png"]
            grad = client.post("/explain", files=files, data={"method": "gradcam"}).json()
            assert body["label"] == grad["label"]
            assert body["probabilities"] == pytest.approx(grad["probabilities"], abs=1e-5)
        else:
            assert res.status_code == 422
            assert res.json()["code"] == "method_unavailable"
            assert "BRAINCAM_OCCLUSION" in res.json()["detail"]


def test_triton_repository_of_a_model_without_gradcam(quadrant_dir: Path, tmp_path: Path) -> None:
    from exporter.triton import verify_repository, write_repository

    repo = write_repository(quadrant_dir, tmp_path / "repo", kind="cpu")
    assert [m.directory.name for m in repo.models] == ["quadrant"]
    verify_repository(repo, load_spec(quadrant_dir), quadrant_dir)
