"""Open Inference Protocol v2 inference (`POST /v2/models/{name}/infer`) against a
real exported model: the same probabilities as /predict for the same image, the
Grad-CAM graph as a second model, JSON and binary tensors, and 4xx errors that
carry OIP's `error` beside `detail` and `code`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from clients import ready_client
from fastapi.testclient import TestClient

from braincam.decoding import decode_image
from braincam.inference import OnnxModel
from braincam.preprocessing import preprocess
from service.core.config import Settings
from service.inference_protocol import GRADCAM_SUFFIX, MAX_BATCH_SIZE
from service.main import create_app

CPU = "CPUExecutionProvider"


@pytest.fixture(scope="module")
def client(tiny_model_dir: Path) -> Iterator[TestClient]:
    settings = Settings(model_dir=tiny_model_dir, providers=CPU, max_concurrency=2)
    with ready_client(settings) as c:
        yield c


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> OnnxModel:
    return OnnxModel(tiny_model_dir, providers=[CPU])


@pytest.fixture(scope="module")
def pngs(demo_data: Path) -> list[bytes]:
    """Real demo slices, one per class folder."""
    paths = [sorted(d.glob("*.png"))[0] for d in sorted((demo_data / "Testing").iterdir())]
    return [p.read_bytes() for p in paths]


def _tensor(model: OnnxModel, png: bytes) -> np.ndarray:
    """The classifier's input, made the way the contract makes it: decode, preprocess."""
    return preprocess(decode_image(png).pixels, model.spec.preprocessing)[None]


def _image_input(batch: np.ndarray, nested: bool = False) -> dict[str, Any]:
    return {
        "name": "image",
        "shape": list(batch.shape),
        "datatype": "FP32",
        "data": batch.tolist() if nested else batch.ravel().tolist(),
    }


def _output(body: dict[str, Any], name: str) -> np.ndarray:
    (out,) = [o for o in body["outputs"] if o["name"] == name]
    return np.asarray(out["data"]).reshape(out["shape"])


def test_infer_equals_predict(client: TestClient, model: OnnxModel, pngs: list[bytes]) -> None:
    name = model.spec.name
    for png in pngs:
        x = _tensor(model, png)
        res = client.post(
            f"/v2/models/{name}/infer", json={"id": "a1", "inputs": [_image_input(x)]}
        )
        assert res.status_code == 200, res.text
        body = res.json()
        assert body["model_name"] == name and body["model_version"] == model.spec.version
        assert body["id"] == "a1"
        # Every output of the graph: the probabilities and the out-of-distribution score.
        assert [o["name"] for o in body["outputs"]] == ["probabilities", "ood_score"]
        out = body["outputs"][0]
        assert out["datatype"] == "FP32"
        assert out["shape"] == [1, len(model.labels)]
        predicted = client.post("/predict", files={"file": ("x.png", png)}).json()
        # Same graph, same tensor: the very same floats, not merely close ones.
        assert out["data"] == [predicted["probabilities"][label] for label in model.labels]
        score = body["outputs"][1]
        assert score["shape"] == [1] and score["data"][0] == pytest.approx(predicted["ood_score"])


def test_batch_nested_data_and_versioned_route(
    client: TestClient, model: OnnxModel, pngs: list[bytes]
) -> None:
    name = model.spec.name
    batch = np.concatenate([_tensor(model, png) for png in pngs])
    flat = client.post(f"/v2/models/{name}/infer", json={"inputs": [_image_input(batch)]})
    nested = client.post(
        f"/v2/models/{name}/versions/{model.spec.version}/infer",
        json={"inputs": [_image_input(batch, nested=True)], "outputs": [{"name": "probabilities"}]},
    )
    assert flat.status_code == nested.status_code == 200, (flat.text, nested.text)
    assert "id" not in flat.json()
    probs = _output(flat.json(), "probabilities")
    assert probs.shape == (len(pngs), len(model.labels))
    np.testing.assert_array_equal(probs, _output(nested.json(), "probabilities"))
    np.testing.assert_allclose(probs, model.predict(batch), rtol=0, atol=1e-6)


def test_gradcam_model(client: TestClient, model: OnnxModel, pngs: list[bytes]) -> None:
    name = model.spec.name + GRADCAM_SUFFIX
    meta = client.get(f"/v2/models/{name}").json()
    assert meta["name"] == name
    tensors = {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"] + meta["outputs"]}
    h, w, _ = model.spec.explanation.activation_shape
    assert tensors["target"] == ("INT64", [-1])
    assert tensors["class_index"] == ("INT64", [-1])
    assert tensors["gradients"][1][:3] == [-1, h, w]
    assert client.get(f"/v2/models/{name}/ready").status_code == 200

    batch = np.concatenate([_tensor(model, png) for png in pngs[:2]])
    targets = [-1, len(model.labels) - 1]
    res = client.post(
        f"/v2/models/{name}/infer",
        json={
            "inputs": [
                _image_input(batch),
                {"name": "target", "shape": [2], "datatype": "INT64", "data": targets},
            ]
        },
    )
    assert res.status_code == 200, res.text
    body = res.json()
    want = model.gradcam(batch, targets)
    assert {o["name"] for o in body["outputs"]} == {
        "probabilities",
        "class_index",
        "activations",
        "gradients",
        "ood_score",
    }
    assert {o["name"]: o["datatype"] for o in body["outputs"]}["class_index"] == "INT64"
    np.testing.assert_allclose(_output(body, "ood_score"), want.ood_score, rtol=1e-5)  # type: ignore[arg-type]
    np.testing.assert_array_equal(_output(body, "class_index"), want.class_index)
    assert _output(body, "class_index")[1] == len(model.labels) - 1
    for key in ("probabilities", "activations", "gradients"):
        np.testing.assert_allclose(
            _output(body, key), getattr(want, key), rtol=1e-5, atol=1e-6, err_msg=key
        )


def _binary_request(
    inputs: list[tuple[str, np.ndarray, str]], outputs: list[str]
) -> tuple[bytes, dict[str, str]]:
    header = {
        "inputs": [
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": datatype,
                "parameters": {"binary_data_size": array.nbytes},
            }
            for name, array, datatype in inputs
        ],
        "outputs": [{"name": o, "parameters": {"binary_data": True}} for o in outputs],
    }
    head = json.dumps(header).encode()
    body = head + b"".join(
        np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes() for _, a, _ in inputs
    )
    return body, {
        "Inference-Header-Content-Length": str(len(head)),
        "Content-Type": "application/octet-stream",
    }


def _read_binary(res: Any) -> dict[str, np.ndarray]:
    n = int(res.headers["inference-header-content-length"])
    header, tail = json.loads(res.content[:n]), res.content[n:]
    types = {"FP32": "<f4", "INT64": "<i8"}
    arrays, offset = {}, 0
    for out in header["outputs"]:
        size = out["parameters"]["binary_data_size"]
        raw = tail[offset : offset + size]
        arrays[out["name"]] = np.frombuffer(raw, dtype=types[out["datatype"]]).reshape(out["shape"])
        offset += size
    assert offset == len(tail)
    return arrays


def test_binary_tensors(client: TestClient, model: OnnxModel, pngs: list[bytes]) -> None:
    """The binary tensor data extension (tritonclient's default): same numbers as JSON."""
    name = model.spec.name
    batch = np.concatenate([_tensor(model, png) for png in pngs[:2]])
    body, headers = _binary_request([("image", batch, "FP32")], ["probabilities"])
    res = client.post(f"/v2/models/{name}/infer", content=body, headers=headers)
    assert res.status_code == 200, res.text
    assert res.headers["content-type"] == "application/octet-stream"
    probs = _read_binary(res)["probabilities"]
    as_json = client.post(f"/v2/models/{name}/infer", json={"inputs": [_image_input(batch)]})
    np.testing.assert_array_equal(probs, _output(as_json.json(), "probabilities"))

    target = np.array([-1, 0], dtype=np.int64)
    body, headers = _binary_request(
        [("image", batch, "FP32"), ("target", target, "INT64")], ["class_index"]
    )
    res = client.post(f"/v2/models/{name}{GRADCAM_SUFFIX}/infer", content=body, headers=headers)
    assert res.status_code == 200, res.text
    np.testing.assert_array_equal(
        _read_binary(res)["class_index"], model.gradcam(batch, target).class_index
    )


def _bad_cases(model: OnnxModel) -> list[tuple[str, str, Any, int, str]]:
    """(id, model name, JSON body or raw bytes, status, a phrase of the message)."""
    name = model.spec.name
    h, w, c = model.spec.input_shape
    n = h * w * c
    good = {"name": "image", "shape": [1, h, w, c], "datatype": "FP32", "data": [0.5] * n}
    gc = name + GRADCAM_SUFFIX
    return [
        ("unknown model", "other", {"inputs": [good]}, 404, "not served"),
        ("not json", name, b"{nope", 400, "not valid JSON"),
        ("no inputs", name, {"inputs": []}, 400, "inputs"),
        ("inputs not a list", name, {"inputs": "image"}, 400, "inputs"),
        ("wrong datatype", name, {"inputs": [{**good, "datatype": "FP64"}]}, 400, "FP32"),
        ("wrong size", name, {"inputs": [{**good, "shape": [1, h + 1, w, c]}]}, 400, "shape"),
        ("wrong rank", name, {"inputs": [{**good, "shape": [h, w, c]}]}, 400, "shape"),
        ("too few values", name, {"inputs": [{**good, "data": [0.5] * (n - 1)}]}, 400, "values"),
        ("ragged", name, {"inputs": [{**good, "data": [[0.5], [0.5, 0.5]]}]}, 400, "ragged"),
        ("strings", name, {"inputs": [{**good, "data": ["0.5"] * n}]}, 400, "numbers"),
        ("no data", name, {"inputs": [{**good, "data": None}]}, 400, "no data"),
        ("unknown input", name, {"inputs": [good, {**good, "name": "mask"}]}, 400, "exactly"),
        ("duplicate input", name, {"inputs": [good, good]}, 400, "exactly"),
        ("unknown output", name, {"inputs": [good], "outputs": [{"name": "logits"}]}, 400,
         "no output"),
        ("target missing", gc, {"inputs": [good]}, 400, "exactly"),
        ("target out of range", gc, {"inputs": [good, {"name": "target", "shape": [1],
         "datatype": "INT64", "data": [len(model.labels)]}]}, 400, "target values"),
        ("target float", gc, {"inputs": [good, {"name": "target", "shape": [1],
         "datatype": "INT64", "data": [0.5]}]}, 400, "numbers"),
        ("batch mismatch", gc, {"inputs": [good, {"name": "target", "shape": [2],
         "datatype": "INT64", "data": [0, 0]}]}, 400, "batch size"),
        ("empty batch", name, {"inputs": [{**good, "shape": [0, h, w, c], "data": []}]}, 400,
         "batch size"),
        ("batch too large", name, {"inputs": [{**good, "shape": [MAX_BATCH_SIZE + 1, h, w, c],
         "data": [0.0] * (n * (MAX_BATCH_SIZE + 1))}]}, 400, "batch size"),
    ]  # fmt: skip


def test_bad_requests_are_4xx_json(client: TestClient, model: OnnxModel) -> None:
    for case, name, body, status, phrase in _bad_cases(model):
        kwargs: dict[str, Any] = (
            {"content": body, "headers": {"Content-Type": "application/json"}}
            if isinstance(body, bytes)
            else {"json": body}
        )
        res = client.post(f"/v2/models/{name}/infer", **kwargs)
        assert res.status_code == status, (case, res.text)
        err = res.json()
        assert set(err) == {"error", "detail", "code"}, case
        assert err["error"] == err["detail"] and phrase in err["detail"], (case, err)
    # NaN is not JSON, but Python's and some clients' encoders write it.
    h, w, c = model.spec.input_shape
    data = ", ".join(["NaN"] + ["0.5"] * (h * w * c - 1))
    raw = (
        f'{{"inputs": [{{"name": "image", "shape": [1, {h}, {w}, {c}], '
        f'"datatype": "FP32", "data": [{data}]}}]}}'
    )
    res = client.post(f"/v2/models/{model.spec.name}/infer", content=raw.encode())
    assert res.status_code == 400 and "NaN" in res.json()["detail"], res.text
    res = client.post(f"/v2/models/{model.spec.name}/versions/7/infer", json={"inputs": []})
    assert res.status_code == 404 and res.json()["code"] == "model_not_found"
    res = client.get(f"/v2/models/{model.spec.name}/infer")
    assert res.status_code == 405


def test_bad_binary_requests(client: TestClient, model: OnnxModel) -> None:
    name = model.spec.name
    h, w, c = model.spec.input_shape
    x = np.zeros((1, h, w, c), dtype=np.float32)
    body, headers = _binary_request([("image", x, "FP32")], ["probabilities"])
    cases = [
        ("short tail", body[:-4], headers, "binary_data_size"),
        ("extra bytes", body + b"\0" * 4, headers, "not used"),
        ("header too long", body, {**headers, "Inference-Header-Content-Length": "99999999"},
         "Inference-Header-Content-Length"),
        ("header not a number", body, {**headers, "Inference-Header-Content-Length": "x"},
         "Inference-Header-Content-Length"),
    ]  # fmt: skip
    for case, content, hdrs, phrase in cases:
        res = client.post(f"/v2/models/{name}/infer", content=content, headers=hdrs)
        assert res.status_code == 400, (case, res.text)
        assert phrase in res.json()["error"], (case, res.text)
    wrong = x[:, :, : w - 1]  # right byte count for a different shape
    body, headers = _binary_request([("image", wrong, "FP32")], ["probabilities"])
    header = json.loads(body[: int(headers["Inference-Header-Content-Length"])])
    header["inputs"][0]["shape"] = [1, h, w, c]
    head = json.dumps(header).encode()
    res = client.post(
        f"/v2/models/{name}/infer",
        content=head + body[int(headers["Inference-Header-Content-Length"]) :],
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert res.status_code == 400 and "bytes of binary data" in res.json()["error"], res.text


def test_model_not_loaded_is_503_with_error(tmp_path: Path) -> None:
    settings = Settings(model_dir=tmp_path / "missing", providers=CPU)
    with TestClient(create_app(settings)) as c:
        c.app.state.runtime.wait(30)  # type: ignore[attr-defined]
        res = c.post("/v2/models/demo/infer", json={"inputs": []})
        assert res.status_code == 503, res.text
        assert res.json()["code"] == "model_unavailable" and res.json()["error"]


def test_png_is_not_a_tensor(client: TestClient, model: OnnxModel) -> None:
    """A client that posts an image file here gets a 400 that says what to send."""
    ok, png = cv2.imencode(".png", np.zeros((8, 8), np.uint8))
    assert ok
    res = client.post(f"/v2/models/{model.spec.name}/infer", content=png.tobytes())
    assert res.status_code == 400 and "JSON" in res.json()["error"], res.text
