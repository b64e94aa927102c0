"""`braincam audit`: explanation quality on a user's own images, without masks.

The pieces against what they must compute (ROAD's imputation, the folded weight
copies of a Grad-CAM graph, the blur figures trainer.explain_eval reports), the
randomisation test on the shipped demo model, a classifier-only model (occlusion), a
model exported from ONNX (NCHW), and the command end to end on a folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from braincam.audit.engine import AuditImage, AuditSettings, audit, load_images, randomise
from braincam.audit.faithfulness import FaithfulnessSettings, image_faithfulness
from braincam.audit.imputation import NEIGHBOURS, linear_impute, noisy_linear_impute
from braincam.audit.maps import Explainer
from braincam.audit.randomisation import cascade, layer_groups
from braincam.cli import main
from braincam.inference import OnnxModel
from braincam.model_spec import GRADCAM_ONNX, MODEL_JSON

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo"
EXAMPLES = ROOT / "examples" / "images"
CPU = ["CPUExecutionProvider"]
FAST = FaithfulnessSettings(road_steps=4, blur_steps=4)


@pytest.fixture(scope="module")
def demo_model() -> OnnxModel:
    return OnnxModel(DEMO, providers=CPU)


# --- ROAD's imputation ----------------------------------------------------------------


def test_imputed_pixels_are_the_weighted_mean_of_their_neighbours() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((20, 24, 2)).astype(np.float32)
    removed = rng.random((20, 24)) < 0.6
    out = linear_impute(img, removed)
    assert np.array_equal(out[~removed], img[~removed])
    h, w = removed.shape
    for y, x in zip(*np.nonzero(removed), strict=True):
        near = [(weight, out[y + dy, x + dx]) for (dy, dx), weight in NEIGHBOURS
                if 0 <= y + dy < h and 0 <= x + dx < w]
        mean = sum(wt * v for wt, v in near) / sum(wt for wt, _ in near)
        np.testing.assert_allclose(out[y, x], mean, atol=1e-5)
    # A hole in a linear ramp is filled with the ramp itself (harmonic = linear there).
    ramp = np.tile(np.linspace(0, 1, 24, dtype=np.float32), (20, 1))[:, :, None]
    hole = np.zeros((20, 24), dtype=bool)
    hole[5:15, 6:18] = True
    np.testing.assert_allclose(linear_impute(ramp, hole), ramp, atol=1e-5)
    noisy = noisy_linear_impute(img, removed, np.random.default_rng(1))
    assert np.array_equal(noisy[~removed], img[~removed])  # noise on filled pixels only
    assert 0 < np.abs(noisy - out)[removed].std() < 0.05 * img.std()


# --- randomisation --------------------------------------------------------------------


def test_folded_weight_copies_are_randomised_with_their_weights() -> None:
    graph = onnx.load(str(DEMO / GRADCAM_ONNX))
    groups = layer_groups(graph, "probabilities")
    assert [g.name for g in groups][:2] == ["logits", "fc_1"]
    assert len(groups) == 6  # logits, fc, four conv blocks
    # tf2onnx folded the transposed Dense kernels of the backward pass into new initializers.
    assert {n for c in groups[0].copies.values() for n, _ in c} == {"const_fold_opt__237"}
    assert {n for c in groups[1].copies.values() for n, _ in c} == {"const_fold_opt__229"}
    inits = {i.name: i for i in graph.graph.initializer}
    before = numpy_helper.to_array(inits["ReadVariableOp:0"]).copy()
    _, edited = next(cascade(graph, groups, seed=0))
    now = {i.name: numpy_helper.to_array(i) for i in edited.graph.initializer}
    kernel = now["ReadVariableOp:0"]
    assert not np.allclose(kernel, before)
    assert kernel.std() == pytest.approx(before.std(), rel=0.2)
    np.testing.assert_array_equal(now["const_fold_opt__237"], kernel.T)


def _examples(model: OnnxModel) -> list[AuditImage]:
    return load_images([EXAMPLES], model, recursive=False, exclude=[]).images


def test_randomisation_lowers_gradcam_spearman_on_the_demo_model(
    demo_model: OnnxModel,
) -> None:
    images = _examples(demo_model)
    explainer = Explainer(demo_model, ["gradcam"])
    x = np.stack([im.x for im in images])
    t = np.argmax(explainer.predict(x), axis=1)
    settings = AuditSettings(("gradcam",), sanity_images=4)
    result = randomise(demo_model, explainer, x, t, settings, lambda stage, n: None)
    steps = result["gradcam"]
    assert [s["step"] for s in steps] == list(range(1, 7))
    assert steps[0]["layer"] == "logits" and steps[-1]["layer"].endswith("block1_conv_1")
    assert steps[0]["folded_copies"] == ["const_fold_opt__237"]
    # The trained maps are reproducible (rho 1 with themselves) ...
    first = explainer.maps(x, t, at_input=False)["gradcam"]
    assert np.array_equal(explainer.maps(x, t, at_input=False)["gradcam"], first)
    # ... and a fully random model's Grad-CAM no longer ranks pixels like them.
    assert steps[-1]["spearman"] is not None and abs(steps[-1]["spearman"]) < 0.5
    assert all(s["spearman"] is None or s["spearman"] < 0.9 for s in steps)


# --- faithfulness ---------------------------------------------------------------------


def test_uniform_deletion_curve_differs_from_gradcams(demo_model: OnnxModel) -> None:
    (im,) = [i for i in _examples(demo_model) if "glioma" in i.path]
    explainer = Explainer(demo_model, ["gradcam"])
    target = int(np.argmax(explainer.predict(im.x[None])[0]))
    maps = {"gradcam": explainer.maps(im.x[None], np.array([target]))["gradcam"][0]}
    out = image_faithfulness(explainer.predict, im.x, maps, target,
                             FaithfulnessSettings(road_steps=5, blur_steps=8),
                             np.random.default_rng(0))
    grad, uniform, rnd = out["gradcam"], out["uniform"], out["random"]
    assert len(grad["deletion_curve"]) == 6 and grad["deletion_curve"][0] == pytest.approx(
        uniform["deletion_curve"][0])  # both start at the untouched image
    assert not np.allclose(grad["deletion_curve"], uniform["deletion_curve"], atol=1e-3)
    # On the glioma example the demo model's map beats chance at deletion.
    assert grad["deletion_auc"] < rnd["deletion_auc"]
    for v in out.values():
        assert 0.0 <= v["deletion_auc"] <= 1.0 and 0.0 <= v["insertion_auc"] <= 1.0


def test_shared_figures_equal_explain_evals(tiny_model_dir: Path, demo_data: Path) -> None:
    """On the demo data the audit reports trainer.explain_eval's blur AUCs and mask
    figures, per image, wherever the decided class is the true one."""
    from trainer.explain_eval import collect_samples, evaluate

    model = OnnxModel(tiny_model_dir, providers=CPU)
    samples = collect_samples(demo_data, "Testing", model.spec.task, model.spec.labels, 2)
    rows, _, _ = evaluate(model, samples, ["gradcam"], steps=4)
    theirs = {r["path"]: r for r in rows if r["method"] == "gradcam"}
    images = load_images([s.path for s in samples], model, recursive=False, exclude=[]).images
    settings = AuditSettings(("gradcam",), FAST, sanity_images=0, stability=False)
    ours = audit(model, images, settings)["images"]
    compared = 0
    for sample, rec in zip(samples, ours, strict=True):
        assert rec["demo_masks"]
        if model.spec.labels.index(rec["label"]) != sample.target:
            continue
        mine, ref = rec["methods"]["gradcam"], theirs[str(sample.path)]
        assert mine["deletion_auc_blur"] == pytest.approx(ref["deletion_auc"], abs=1e-6)
        assert mine["insertion_auc_blur"] == pytest.approx(ref["insertion_auc"], abs=1e-6)
        assert rec["references"]["random"]["deletion_auc_blur"] == pytest.approx(
            ref["random_deletion_auc"], abs=1e-6)
        for key in ("off_brain_mass", "energy_in_mask", "pointing_game", "lesion_auroc"):
            a, b = mine[key], ref[key]
            assert (a is None and np.isnan(b)) or a == pytest.approx(b, abs=1e-9), key
        compared += 1
    assert compared >= 2


# --- model directories: classifier-only, ONNX-exported ---------------------------------


def test_a_classifier_only_model_is_audited_by_occlusion(
    tiny_model_dir: Path, demo_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "nogradcam"
    shutil.copytree(tiny_model_dir, out)
    (out / GRADCAM_ONNX).unlink()
    raw = json.loads((out / MODEL_JSON).read_text())
    del raw["graphs"]["gradcam"]
    (out / MODEL_JSON).write_text(json.dumps(raw))
    image = sorted((demo_data / "Testing" / "glioma").glob("*.png"))[0]
    report_dir = tmp_path / "report"
    code = main(["audit", str(image), "--model-dir", str(out), "--out",
                 str(report_dir), "--road-steps", "4", "--blur-steps", "4",
                 "--sanity-images", "1", "--no-stability", "--quiet",
                 "--providers", "CPUExecutionProvider"])
    assert code == 0
    report = json.loads((report_dir / "audit.json").read_text())
    assert report["settings"]["methods"] == ["occlusion"]
    (im,) = report["images"]
    occ = im["methods"]["occlusion"]
    assert 0.0 <= occ["deletion_auc"] <= 1.0 and occ["heat_outside_head"] is not None
    steps = report["randomisation"]["occlusion"]
    assert len(steps) >= 2 and all(-1.0 <= (s["spearman"] or 0.0) <= 1.0 for s in steps)


def _tiny_onnx_cnn(path: Path, size: int) -> None:
    """image [N,1,size,size] -> Conv/ReLU/MaxPool/Conv/ReLU/GAP/Gemm/Softmax, random weights."""
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int, scale: float = 0.5) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32),
                                       name)

    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, size, size])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 4])],
        [init("w1", 6, 1, 3, 3), init("b1", 6, scale=0.1), init("w2", 8, 6, 3, 3),
         init("b2", 8, scale=0.1), init("w3", 4, 8), init("b3", 4, scale=0.1)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))


def test_an_onnx_exported_model(tmp_path: Path, demo_data: Path) -> None:
    from exporter.cli import main as export_main

    src = tmp_path / "tiny.onnx"
    _tiny_onnx_cnn(src, 64)
    out = tmp_path / "onnx_model"
    assert export_main(["--model", str(src), "--out", str(out), "--labels",
                        "glioma,meningioma,pituitary,notumor", "--scale", "unit",
                        "--calibration", str(demo_data / "Testing")]) == 0
    model = OnnxModel(out, providers=CPU)
    assert model.spec.preprocessing.layout == "nchw"
    images = load_images([demo_data / "Testing" / "glioma"], model, False, []).images[:2]
    result = audit(model, images, AuditSettings(("gradcam",), FAST, sanity_images=2))
    steps = result["randomisation"]["gradcam"]
    assert len(steps) == 3  # Gemm, conv 2, conv 1
    for rec in result["images"]:
        v = rec["methods"]["gradcam"]
        assert 0.0 <= v["deletion_auc"] <= 1.0 and -1.0 <= v["flip_spearman"] <= 1.0


# --- the command ----------------------------------------------------------------------


def test_cli_end_to_end_on_a_folder(tiny_model_dir: Path, demo_data: Path,
                                    tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    (scans / "sub").mkdir(parents=True)
    pngs = sorted((demo_data / "Testing").rglob("*.png"))
    for p in pngs[::6][:3]:
        shutil.copy(p, scans / f"{p.parent.name}_{p.name}")
    shutil.copy(pngs[-1], scans / "sub" / "deeper.png")
    (scans / "notes.txt").write_text("not an image\n")
    out = scans / "audit"  # inside the scanned folder: its own files are not scans
    code = main(["audit", str(scans), "--recursive", "--model-dir", str(tiny_model_dir),
                 "--out", str(out), "--methods", "gradcam,hirescam", "--road-steps", "4",
                 "--blur-steps", "4", "--sanity-images", "2", "--quiet",
                 "--providers", "CPUExecutionProvider"])
    assert code == 0
    report = json.loads((out / "audit.json").read_text())
    assert len(report["images"]) == 4
    assert [s["path"] for s in report["skipped"]] == [str(scans / "notes.txt")]
    keys = {"heat_outside_head", "heat_on_rim", "deletion_auc", "insertion_auc",
            "deletion_auc_blur", "insertion_auc_blur", "class_flips", "flip_spearman",
            "noise_spearman", "deletion_curve", "insertion_curve"}
    labels = set(json.loads((tiny_model_dir / MODEL_JSON).read_text())["labels"])
    for im in report["images"]:
        assert {"path", "label", "methods"} <= set(im) and im["label"] in labels
        assert set(im["methods"]) == {"gradcam", "hirescam"}
        for v in im["methods"].values():
            assert keys <= set(v)
            assert len(v["deletion_curve"]) == 5
            for k in ("heat_outside_head", "heat_on_rim"):
                assert v[k] is None or 0.0 <= v[k] <= 1.0
    rnd = report["randomisation"]
    assert set(rnd) == {"gradcam", "hirescam"}
    for steps in rnd.values():
        assert steps and [s["step"] for s in steps] == list(range(1, len(steps) + 1))
        assert {"step", "layer", "spearman"} <= set(steps[0])
    summary = report["summary"]["methods"]["gradcam"]
    assert 0.0 <= summary["flip_share"] <= 1.0
    assert set(summary["heat_per_class"]) == {im["label"] for im in report["images"]}
    md = (out / "audit.md").read_text()
    assert "## Faithfulness" in md and "| *random* |" in md and "cascading randomisation" in md
    assert (out / "worst_images.png").read_bytes().startswith(b"\x89PNG")
    # Nothing readable: exit 1; a method the model lacks: exit 2.
    assert main(["audit", str(scans / "notes.txt"), "--model-dir", str(tiny_model_dir),
                 "--out", str(tmp_path / "x"), "--quiet"]) == 1
    assert main(["audit", str(scans), "--model-dir", str(tiny_model_dir), "--out",
                 str(tmp_path / "y"), "--methods", "nosuch", "--quiet"]) == 2


def test_the_audit_imports_neither_tensorflow_nor_trainer() -> None:
    code = ("import sys, braincam.cli, braincam.audit.command, braincam.audit.engine, "
            "braincam.audit.report; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'trainer', "
            "'fastapi', 'torch')]; print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
