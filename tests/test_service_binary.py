"""A binary model whose tuned threshold disagrees with argmax, served through /explain.

The exported tiny model of `conftest.py` is a 4-class model, so the binary decision
path is tested on a hand-made ONNX graph pair (written with `onnx.helper`) that
honours the model directory contract exactly:

    image [N,H,W,1] -> 4x4 average pool -> 1x1 conv (C channels) -> ReLU = activations
    activations -> global average pool -> dense -> softmax = probabilities

Its Grad-CAM gradients are known in closed form (d logit_k / dA = W[:, k] / (h*w)).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from braincam.model_spec import (
    CLASSIFIER_ONNX,
    GRADCAM_ONNX,
    Decision,
    Explanation,
    GraphFile,
    Graphs,
    ModelSpec,
    load_spec,
    save_spec,
    sha256_file,
)
from braincam.preprocessing import Preprocessing

SIZE = 32
POOL = 4
CHANNELS = 4


def build_toy_model(
    out: Path,
    labels: list[str],
    task: str = "multiclass",
    decision: Decision | None = None,
    seed: int = 0,
) -> Path:
    """Write classifier.onnx, gradcam.onnx and model.json of a tiny hand-made CNN."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    k = len(labels)
    h = w = SIZE // POOL
    conv_w = rng.normal(0, 4, (CHANNELS, 1, 1, 1)).astype(np.float32)
    conv_b = rng.normal(0, 0.5, (CHANNELS,)).astype(np.float32)
    dense_w = rng.normal(0, 2, (CHANNELS, k)).astype(np.float32)
    dense_b = np.zeros((k,), dtype=np.float32)
    if task == "binary":
        dense_b[:] = (2.0, -2.0)  # p(positive) is small: a low threshold flips decisions

    def inits() -> list[Any]:
        return [
            numpy_helper.from_array(conv_w, "conv_w"),
            numpy_helper.from_array(conv_b, "conv_b"),
            numpy_helper.from_array(dense_w, "dense_w"),
            numpy_helper.from_array(dense_b, "dense_b"),
        ]

    forward = [
        helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node(
            "AveragePool", ["nchw"], ["pooled"], kernel_shape=[POOL, POOL], strides=[POOL, POOL]
        ),
        helper.make_node("Conv", ["pooled", "conv_w", "conv_b"], ["conv"]),
        helper.make_node("Relu", ["conv"], ["acts_nchw"]),
        helper.make_node("Transpose", ["acts_nchw"], ["activations"], perm=[0, 2, 3, 1]),
        helper.make_node("GlobalAveragePool", ["acts_nchw"], ["gap4"]),
        helper.make_node("Flatten", ["gap4"], ["gap"], axis=1),
        helper.make_node("MatMul", ["gap", "dense_w"], ["mm"]),
        helper.make_node("Add", ["mm", "dense_b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", SIZE, SIZE, 1])
    probs = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", k])
    opset = [helper.make_opsetid("", 17)]

    classifier = helper.make_graph(forward, "classifier", [image], [probs], inits())
    onnx.save(helper.make_model(classifier, opset_imports=opset), out / CLASSIFIER_ONNX)

    backward = [
        helper.make_node("ArgMax", ["probabilities"], ["predicted"], axis=1, keepdims=0),
        helper.make_node("Less", ["target", "zero"], ["use_predicted"]),
        helper.make_node("Where", ["use_predicted", "predicted", "target"], ["class_index"]),
        # d logit_k / d A[n,i,j,c] = dense_w[c, k] / (h*w), the same at every location.
        helper.make_node("Gather", ["dense_wt_scaled", "class_index"], ["g_nc"], axis=0),
        helper.make_node("Unsqueeze", ["g_nc", "axes12"], ["g_n11c"]),
        helper.make_node("Shape", ["activations"], ["acts_shape"]),
        helper.make_node("Expand", ["g_n11c", "acts_shape"], ["gradients"]),
    ]
    extra = [
        numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes12"),
        numpy_helper.from_array(
            np.ascontiguousarray(dense_w.T / np.float32(h * w)), "dense_wt_scaled"
        ),
    ]
    target = helper.make_tensor_value_info("target", TensorProto.INT64, ["N"])
    outputs = [
        probs,
        helper.make_tensor_value_info("class_index", TensorProto.INT64, ["N"]),
        helper.make_tensor_value_info("activations", TensorProto.FLOAT, ["N", h, w, CHANNELS]),
        helper.make_tensor_value_info("gradients", TensorProto.FLOAT, ["N", h, w, CHANNELS]),
    ]
    gradcam = helper.make_graph(
        forward + backward, "gradcam", [image, target], outputs, inits() + extra
    )
    onnx.save(helper.make_model(gradcam, opset_imports=opset), out / GRADCAM_ONNX)

    def graph_file(name: str, inputs: dict[str, list[int | None]], outs: list[str]) -> GraphFile:
        shapes: dict[str, list[int | None]] = {
            "probabilities": [None, k],
            "class_index": [None],
            "activations": [None, h, w, CHANNELS],
            "gradients": [None, h, w, CHANNELS],
        }
        path = out / name
        return GraphFile(
            file=name,
            sha256=sha256_file(path),
            size_bytes=path.stat().st_size,
            inputs=inputs,
            outputs={o: shapes[o] for o in outs},
        )

    image_shape: list[int | None] = [None, SIZE, SIZE, 1]
    spec = ModelSpec(
        name=f"toy-{task}",
        version="7",
        task=task,  # type: ignore[arg-type]
        labels=labels,
        preprocessing=Preprocessing(height=SIZE, width=SIZE, channels=1, scale="unit"),
        decision=decision or Decision(),
        explanation=Explanation(layer="toy_conv", activation_shape=[h, w, CHANNELS]),
        graphs=Graphs(
            classifier=graph_file(CLASSIFIER_ONNX, {"image": image_shape}, ["probabilities"]),
            gradcam=graph_file(
                GRADCAM_ONNX,
                {"image": image_shape, "target": [None]},
                ["probabilities", "class_index", "activations", "gradients"],
            ),
        ),
        opset=17,
    )
    save_spec(spec, out)
    return out


def _png(seed: int) -> bytes:
    """Smooth random images of assorted brightness (so p(tumor) varies between them)."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (40, 48), dtype=np.uint8)
    img = cv2.GaussianBlur(noise, (7, 7), 3).astype(np.float32)
    img = np.clip((img - img.mean()) * 2.0 + 20 + 36 * seed, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


IMAGES = [_png(seed) for seed in range(7)]


def _p_tumor(model_dir: Path) -> list[float]:
    from braincam.decoding import decode_image
    from braincam.inference import OnnxModel
    from braincam.preprocessing import preprocess

    model = OnnxModel(model_dir, providers=["CPUExecutionProvider"])
    x = np.stack([preprocess(decode_image(d).pixels, model.spec.preprocessing) for d in IMAGES])
    return [float(p) for p in model.predict(x)[:, 1]]


@pytest.fixture(scope="module")
def binary_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("toy_binary")
    build_toy_model(
        out,
        ["notumor", "tumor"],
        task="binary",
        decision=Decision(positive_label="tumor", threshold=0.5),
    )
    # A threshold at the median p(tumor) of the test images: whichever side of 0.5 it
    # falls, the images between it and 0.5 are decided against their argmax.
    p = sorted(_p_tumor(out))
    threshold = (p[len(p) // 2] + p[len(p) // 2 - 1]) / 2
    spec = load_spec(out)
    spec.decision = Decision(positive_label="tumor", threshold=threshold, threshold_method="test")
    save_spec(spec, out)
    return out


def test_threshold_decision_is_explained_with_its_own_gradient(binary_model_dir: Path) -> None:
    from fastapi.testclient import TestClient

    from service.core.config import Settings
    from service.main import create_app

    threshold = load_spec(binary_model_dir).decision.threshold
    assert threshold is not None
    settings = Settings(model_dir=binary_model_dir, providers="CPUExecutionProvider")
    flipped = 0
    with TestClient(create_app(settings)) as client:
        assert client.app.state.runtime.wait(30)
        assert client.get("/ready").status_code == 200
        served = client.app.state.runtime.model
        original = served.gradcam
        calls: list[list[int]] = []

        def spy(batch: np.ndarray, targets: Any = None) -> Any:
            calls.append([int(t) for t in targets])
            return original(batch, targets)

        served.gradcam = spy  # type: ignore[method-assign]
        for data, p_tumor in zip(IMAGES, _p_tumor(binary_model_dir), strict=True):
            argmax = int(p_tumor > 0.5)
            decided = int(p_tumor >= threshold)

            pred = client.post("/predict", files={"file": ("x.png", io.BytesIO(data))})
            assert pred.status_code == 200, pred.text
            assert pred.json()["class_index"] == decided
            assert pred.json()["label"] == ["notumor", "tumor"][decided]
            assert pred.json()["probabilities"]["tumor"] == p_tumor

            calls.clear()
            res = client.post("/explain", files={"file": ("x.png", io.BytesIO(data))})
            assert res.status_code == 200, res.text
            body = res.json()
            # Target -1 (argmax) first; the decided class explicitly when they differ.
            assert calls == ([[-1]] if decided == argmax else [[-1], [decided]])
            assert body["class_index"] == decided
            assert body["target"] == {"class_index": decided, "label": body["label"]}
            # A second gradcam run only when the threshold overrode argmax.
            assert body["gradcam_runs"] == (1 if decided == argmax else 2)
            flipped += decided != argmax

            # An explicit target is always one run, and explaining the decided class
            # explicitly gives the very same heatmap as the default.
            res = client.post(
                "/explain",
                files={"file": ("x.png", io.BytesIO(data))},
                data={"target": str(decided)},
            )
            assert res.status_code == 200 and res.json()["gradcam_runs"] == 1
            assert res.json()["heatmap_png"] == body["heatmap_png"]
    assert flipped > 0, "the threshold should override argmax for some images"
