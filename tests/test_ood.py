"""Out-of-distribution gate and temperature scaling: statistics, graphs, service policy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from braincam.calibration import (
    brier_score,
    calibrated_threshold,
    expected_calibration_error,
    fit_temperature,
    softmax,
)
from braincam.datasets import load_dataset_split
from braincam.inference import OnnxModel
from braincam.model_spec import MODEL_JSON, load_spec
from braincam.ood import energy_score, mahalanobis_score
from braincam.overlay import encode_png
from exporter import ood_graph
from exporter.export import GRID_FEATURES_TENSOR
from exporter.fit_data import from_trainer_run
from exporter.ood_fit import RANK, precision_form
from tests.clients import ready_client

CPU = ["CPUExecutionProvider"]
LABELS = ["glioma", "meningioma", "pituitary", "notumor"]


def ledoit_wolf_reference(x: np.ndarray) -> np.ndarray:
    """Ledoit & Wolf (2004), written out: the shrunk covariance of centred data [n,p]."""
    n, p = x.shape
    emp = x.T @ x / n
    mu = np.trace(emp) / p
    x2 = x**2
    beta = (np.sum(x2.T @ x2) / n - np.sum(emp**2)) / n  # Σ_i ‖x_i x_iᵀ − S‖² / n²
    delta = np.sum((emp - mu * np.eye(p)) ** 2)
    shrinkage = min(beta, delta) / delta
    return (1 - shrinkage) * emp + shrinkage * mu * np.eye(p)


def _initializers(model_dir: Path) -> dict[str, np.ndarray]:
    proto = onnx.load(str(model_dir / "classifier.onnx"))  # external weights resolved
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def _features_logits(model_dir: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tensors the detector reads (model.json names them), from the exported graph."""
    spec = load_spec(model_dir)
    assert spec.ood is not None
    proto = onnx.load(str(model_dir / "classifier.onnx"))
    f, z = ood_graph.tensor_values(proto, x, [spec.ood.features, spec.ood.logits])
    return f.reshape(len(f), -1).astype(np.float64), z.astype(np.float64)


def test_exported_statistics_equal_a_numpy_reference(tiny_model_dir: Path, tiny_run: Path) -> None:
    spec = load_spec(tiny_model_dir)
    assert spec.ood is not None and spec.ood.detector == "mahalanobis"
    # The default: the explained layer's activations averaged on a 2x2 grid.
    c = spec.explanation.activation_shape[2]
    assert spec.ood.features == GRID_FEATURES_TENSOR and spec.ood.feature_dim == 4 * c
    run = json.loads((tiny_run / "run.json").read_text())
    images = from_trainer_run(run, spec.preprocessing, spec.labels)
    assert spec.ood.fit_size == len(images.fit_x) and spec.ood.held_out_size == len(images.held_x)
    assert images.fit_y is not None
    f, _ = _features_logits(tiny_model_dir, images.fit_x)
    means = np.stack([f[images.fit_y == k].mean(axis=0) for k in range(len(spec.labels))])
    cov = ledoit_wolf_reference(f - means[images.fit_y])
    init = _initializers(tiny_model_dir)
    np.testing.assert_allclose(init["braincam_trust_maha_means"], means, rtol=1e-5, atol=1e-5)
    # The graph's precision s·I − U Uᵀ: the inverse covariance on its RANK directions of
    # largest variance, the mean inverse variance of the others on the rest.
    basis = init["braincam_trust_maha_basis"].astype(np.float64)
    precision = float(init["braincam_trust_maha_scale"]) * np.eye(len(cov)) - basis @ basis.T
    lam, vectors = np.linalg.eigh(cov)
    lam, vectors = lam[::-1], vectors[:, ::-1]
    r = spec.ood.rank
    assert r == basis.shape[1] == min(RANK, len(cov))
    head = vectors[:, :r]
    tail = 1.0 / lam[r:]
    reference = head @ np.diag(1.0 / lam[:r]) @ head.T + tail.mean() * (
        np.eye(len(cov)) - head @ head.T
    )
    np.testing.assert_allclose(precision, reference, atol=1e-3 * np.abs(reference).max())


def test_in_graph_scores_equal_the_numpy_scores(tiny_model_dir: Path, demo_data: Path) -> None:
    model = OnnxModel(tiny_model_dir, providers=CPU)
    spec = model.spec
    assert spec.ood is not None and spec.calibration is not None
    test = load_dataset_split(demo_data, "Testing", spec.preprocessing)
    out = model.classify(test.x)
    f, z = _features_logits(tiny_model_dir, test.x)
    init = _initializers(tiny_model_dir)
    reference = mahalanobis_score(
        f,
        init["braincam_trust_maha_means"],
        float(init["braincam_trust_maha_scale"]),
        init["braincam_trust_maha_basis"],
    )
    assert out.ood_score is not None
    np.testing.assert_allclose(out.ood_score, reference, rtol=1e-3)
    # Both graphs: the same score, and probabilities = softmax(logits / T).
    cam = model.gradcam(test.x)
    np.testing.assert_allclose(cam.ood_score, out.ood_score, rtol=1e-5)
    t = spec.calibration.temperature
    np.testing.assert_allclose(out.probabilities, softmax(z, t), atol=1e-5)
    np.testing.assert_allclose(cam.probabilities, softmax(z, t), atol=1e-5)


def test_temperature_leaves_the_explanation_untouched(tiny_model_dir: Path) -> None:
    """The class choice and the gradients read the logits, never the temperature."""
    graph = onnx.load(str(tiny_model_dir / "gradcam.onnx"), load_external_data=False).graph
    producers = {out: node for node in graph.node for out in node.output}

    def ancestors(name: str) -> set[str]:
        seen, todo = set(), [name]
        while todo:
            node = producers.get(todo.pop())
            if node is not None and node.name not in seen:
                seen.add(node.name)
                todo.extend(node.input)
        return seen | {i for n in graph.node if n.name in seen for i in n.input}

    assert "braincam_trust_temperature" in ancestors("probabilities")
    for output in ("gradients", "class_index", "activations"):
        assert "braincam_trust_temperature" not in ancestors(output)


@pytest.fixture(scope="module")
def ood_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second demo dataset (another seed): 40 + 25 images per class, to fit and test on."""
    from trainer.demo_data import build_demo_dataset

    root = tmp_path_factory.mktemp("ood_data")
    build_demo_dataset(root, per_class=40, test_per_class=25, size=64, seed=1)
    return root


@pytest.fixture(scope="module")
def byo_model_dir(tiny_run: Path, ood_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as a bring-your-own Keras file: fitted on --calibration images."""
    from exporter.export import export_model

    work = tmp_path_factory.mktemp("byo")
    shutil.copy(tiny_run / "model.keras", work / "model.keras")  # no run.json beside it
    out = work / "model"
    export_model(work / "model.keras", out, calibration=ood_data, labels=LABELS)
    return out


def _photo_like(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A 1/f random field (natural images' spectrum) with hard-edged bright objects."""
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :]
    amplitude = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(h, w))
    field = np.real(np.fft.ifft2(amplitude * np.exp(2j * np.pi * rng.uniform(size=(h, w)))))
    img = (field - field.min()) / np.ptp(field)
    img[h // 4 : h // 2, w // 5 : w // 2] = 0.9
    img[2 * h // 3 :, : w // 3] = 0.15
    return (img * 255).astype(np.uint8)


def test_gate_passes_held_out_images_and_flags_foreign_ones(
    byo_model_dir: Path, ood_data: Path
) -> None:
    model = OnnxModel(byo_model_dir, providers=CPU)
    spec = model.spec
    assert spec.ood is not None and spec.calibration is not None
    assert "calibration images" in spec.ood.fit_data and spec.ood.held_out_size >= 30
    test = load_dataset_split(ood_data, "Testing", spec.preprocessing)
    scores = model.classify(test.x).ood_score
    assert scores is not None
    false_alarms = float(np.mean(scores > spec.ood.threshold))
    assert false_alarms <= 0.07, false_alarms
    h, w, c = spec.input_shape
    rng = np.random.default_rng(0)
    foreign = {
        "noise": rng.uniform(0, 1, (h, w, c)),
        "flat": np.full((h, w, c), 0.5),
        "photograph-like": np.repeat(_photo_like(h, w, rng)[..., None], c, -1) / 255.0,
    }
    for name, x in foreign.items():
        (score,) = model.classify(x[None].astype(np.float32)).ood_score  # type: ignore[misc]
        assert score > spec.ood.threshold, name


def test_reject_policy_refuses_flagged_images(byo_model_dir: Path, ood_data: Path) -> None:
    from service.core.config import Settings

    spec = load_spec(byo_model_dir)
    h, w, _ = spec.input_shape
    noise = encode_png(np.random.default_rng(1).integers(0, 256, (h, w), dtype=np.uint8))
    scan = next((ood_data / "Testing" / "glioma").glob("*.png")).read_bytes()
    with ready_client(
        Settings(model_dir=byo_model_dir, providers="CPUExecutionProvider", ood_policy="reject")
    ) as client:
        res = client.post("/predict", files={"file": ("n.png", noise, "image/png")})
        assert res.status_code == 422
        assert res.json()["code"] == "out_of_distribution"
        assert "threshold" in res.json()["detail"]
        res = client.post("/explain", files={"file": ("n.png", noise, "image/png")})
        assert res.status_code == 422 and res.json()["code"] == "out_of_distribution"
        ok = client.post("/predict", files={"file": ("s.png", scan, "image/png")}).json()
        assert ok["in_distribution"] is True and ok["ood_score"] <= ok["ood_threshold"]
        meta = client.get("/metadata").json()
        assert meta["out_of_distribution"]["policy"] == "reject"
        assert meta["out_of_distribution"]["threshold"] == spec.ood.threshold  # type: ignore[union-attr]
        assert meta["temperature"] == spec.calibration.temperature  # type: ignore[union-attr]
        metrics = client.get("/metrics").text
        assert 'braincam_out_of_distribution_total{endpoint="/predict",policy="reject"} 1.0' in (
            metrics
        )


def test_warn_policy_answers_with_the_verdict(byo_model_dir: Path) -> None:
    from service.core.config import Settings

    h, w, _ = load_spec(byo_model_dir).input_shape
    noise = encode_png(np.random.default_rng(2).integers(0, 256, (h, w), dtype=np.uint8))
    for batching in (False, True):
        settings = Settings(
            model_dir=byo_model_dir, providers="CPUExecutionProvider", batching=batching
        )
        with ready_client(settings) as client:
            for route in ("/predict", "/explain"):
                res = client.post(route, files={"file": ("n.png", noise, "image/png")})
                assert res.status_code == 200, res.text
                body = res.json()
                assert body["in_distribution"] is False
                assert body["ood_score"] > body["ood_threshold"]


def test_model_json_without_trust_sections_still_loads(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    old = tmp_path / "old"
    shutil.copytree(tiny_model_dir, old)
    data = json.loads((old / MODEL_JSON).read_text())
    del data["ood"], data["calibration"]
    (old / MODEL_JSON).write_text(json.dumps(data))
    spec = load_spec(old)
    assert spec.ood is None and spec.calibration is None
    model = OnnxModel(old, providers=CPU)
    x = np.zeros((1, *spec.input_shape), np.float32)
    assert model.classify(x).ood_score is None  # the output is there but not described


def test_calibration_lowers_the_error_on_its_validation_split(tiny_model_dir: Path) -> None:
    calibration = load_spec(tiny_model_dir).calibration
    assert calibration is not None
    f = calibration.figures
    assert f["ece_after"] <= f["ece_before"] and f["nll_after"] <= f["nll_before"]


def test_calibration_functions() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 400)
    # Overconfident logits: right 70 % of the time, scaled far up.
    z = rng.normal(size=(400, 3))
    right = rng.uniform(size=400) < 0.7
    z[right, labels[right]] += 2.0
    t, at_bound = fit_temperature(8.0 * z, labels)
    assert 4.0 < t < 16.0 and not at_bound  # undoes most of the x8
    before, after = softmax(8.0 * z), softmax(8.0 * z, t)
    assert expected_calibration_error(after, labels) < expected_calibration_error(before, labels)
    assert brier_score(after, labels) < brier_score(before, labels)
    assert brier_score(np.eye(3)[labels], labels) == 0.0
    # A binary threshold moved to the calibrated scale decides the same images.
    delta = rng.normal(size=200) * 3
    p, p_cal = 1 / (1 + np.exp(-delta)), 1 / (1 + np.exp(-delta / 2.5))
    moved = calibrated_threshold(0.7, 2.5)
    assert np.array_equal(p >= 0.7, p_cal >= moved)


def test_a_perfectly_separated_fit_set_keeps_the_models_scale() -> None:
    # Every label is the argmax: the likelihood rises without limit as T -> 0.
    z = np.random.default_rng(3).normal(size=(50, 4))
    t, at_bound = fit_temperature(z, z.argmax(axis=1))
    assert (t, at_bound) == (1.0, True)


@pytest.mark.parametrize("opset", [13, 18])
def test_graph_edits_on_a_plain_onnx_classifier(opset: int) -> None:
    """The edits work on any ONNX graph given tensor names (the ONNX-level exporter's case)."""
    rng = np.random.default_rng(opset)
    d, k = 6, 3
    w = rng.normal(size=(d, k)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["image"], ["feats"]),
            helper.make_node("MatMul", ["feats", "w"], ["z"]),
            helper.make_node("Softmax", ["z"], ["probabilities"], axis=-1),
        ],
        "plain",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [None, 2, 3, 1])],
        [helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, [None, k])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    means = rng.normal(size=(k, d))
    cov = np.cov(rng.normal(size=(50, d)).T)
    scale, basis = precision_form(cov)  # rank >= d: the exact inverse
    np.testing.assert_allclose(scale * np.eye(d) - basis @ basis.T, np.linalg.inv(cov),
                               atol=1e-9 * np.abs(np.linalg.inv(cov)).max())
    energy = onnx.ModelProto()
    energy.CopyFrom(model)
    ood_graph.apply_temperature(model, "z", "probabilities", 2.0)
    ood_graph.append_mahalanobis(model, "feats", means, scale, basis)
    ood_graph.append_energy(energy, "z")
    onnx.checker.check_model(model, full_check=True)
    x = rng.normal(size=(5, 2, 3, 1)).astype(np.float32)
    probs, score = ood_graph.tensor_values(model, x, ["probabilities", "ood_score"])
    feats = x.reshape(5, -1).astype(np.float64)
    np.testing.assert_allclose(probs, softmax(feats @ w, 2.0), atol=1e-6)
    d_k = feats[:, None, :] - means[None]
    exact = np.einsum("nkd,de,nke->nk", d_k, np.linalg.inv(cov), d_k).min(axis=1)
    np.testing.assert_allclose(score, exact, rtol=1e-4)
    np.testing.assert_allclose(mahalanobis_score(feats, means, scale, basis), exact, rtol=1e-9)
    (e,) = ood_graph.tensor_values(energy, x, ["ood_score"])
    np.testing.assert_allclose(e, energy_score(feats @ w), rtol=1e-5)
    # The old softmax is gone; nothing dangles.
    assert [n.op_type for n in model.graph.node].count("Softmax") == 1


def test_ood_eval_report(tiny_model_dir: Path, demo_data: Path, tmp_path: Path) -> None:
    from trainer.ood_eval import main

    out = tmp_path / "ood.md"
    assert main(["--model-dir", str(tiny_model_dir), "--data", str(demo_data),
                 "--out", str(out), "--latency-runs", "0"]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    sets = {r["set"]: r for r in report["sets"]}
    assert report["in_distribution"]["n"] == 24
    assert {r["group"] for r in sets.values()} == {"far", "near"}
    assert all(r["n"] > 0 for r in sets.values())
    noise = next(r for name, r in sets.items() if name.startswith("noise"))
    assert noise["flagged"] >= 0.9 and noise["auroc"]["mahalanobis"] >= 0.95
    assert "| set | kind | n | flagged | AUROC mahalanobis |" in out.read_text()


def test_the_onnx_level_exporter_writes_the_detector_too(
    tiny_run: Path, ood_data: Path, tmp_path: Path
) -> None:
    """Any ONNX classifier: the score on its pooled features, in both graphs."""
    import keras
    import tensorflow as tf
    import tf2onnx

    from exporter.onnx_export import export_onnx_model

    model = keras.models.load_model(tiny_run / "model.keras", compile=False)
    source = tmp_path / "tiny.onnx"
    spec_in = (tf.TensorSpec((None, 64, 64, 1), tf.float32, name="x"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec_in, opset=17)
    onnx.save(proto, str(source))
    result = export_onnx_model(source, tmp_path / "out", labels=LABELS, calibration=ood_data)
    spec = result.spec
    assert spec.ood is not None and spec.ood.detector == "mahalanobis"
    assert spec.ood.features == result.anatomy.pooled_features and spec.calibration is None
    model_dir = tmp_path / "out"
    onnx_model = OnnxModel(model_dir, providers=CPU)
    test = load_dataset_split(ood_data, "Testing", spec.preprocessing)
    out = onnx_model.classify(test.x)
    assert out.ood_score is not None
    np.testing.assert_allclose(onnx_model.gradcam(test.x).ood_score, out.ood_score, rtol=1e-5)
    f, _ = _features_logits(model_dir, test.x)
    init = _initializers(model_dir)
    reference = mahalanobis_score(f, init["braincam_trust_maha_means"],
                                  float(init["braincam_trust_maha_scale"]),
                                  init["braincam_trust_maha_basis"])
    np.testing.assert_allclose(out.ood_score, reference, rtol=1e-3)
    assert float(np.mean(out.ood_score > spec.ood.threshold)) <= 0.1
