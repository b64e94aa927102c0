"""The demo model shipped in models/demo is what its model.json says it is.

`make demo` serves this directory without training anything, so the repository's
copy must be intact (sha256), loadable, internally consistent (the Grad-CAM graph
agrees with the classifier) and as accurate as recorded: its test split is rendered
afresh from the recorded dataset parameters and sent through the service's /predict.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from clients import ready_client

from braincam.inference import CPU, OnnxModel
from braincam.model_spec import load_spec, sha256_file
from braincam.overlay import encode_png

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "demo"


@pytest.fixture(scope="module")
def shipped() -> OnnxModel:
    return OnnxModel(SHIPPED, providers=[CPU])


def test_files_match_the_recorded_sha256() -> None:
    spec = load_spec(SHIPPED, verify=False)
    for entry in spec.graphs.files():
        path = SHIPPED / entry.file
        assert path.is_file(), f"{entry.file} is listed in model.json but not shipped"
        assert sha256_file(path) == entry.sha256, entry.file
        assert path.stat().st_size == entry.size_bytes, entry.file


def test_small_enough_to_ship() -> None:
    total = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert total < 8 * 2**20, f"models/demo is {total / 2**20:.1f} MiB"


def test_records_how_it_was_made() -> None:
    spec = load_spec(SHIPPED, verify=False)
    made = spec.provenance
    for key in ("trainer_version", "seed", "epochs", "dataset", "test_metrics",
                "explanation_quality"):
        assert key in made, key
    assert made["dataset"]["synthetic"] is True
    assert spec.notice and "never seen a real scan" in spec.notice
    assert 0.0 < made["test_metrics"]["accuracy"] <= 1.0
    assert set(made["explanation_quality"]["methods"]) >= {"gradcam"}
    for name in ("MODEL_CARD.md", "run/metrics.json", "run/training_curves.png",
                 "run/confusion_matrix.png"):
        assert (SHIPPED / name).is_file(), name
    metrics = json.loads((SHIPPED / "run" / "metrics.json").read_text())
    assert metrics["accuracy"] == made["test_metrics"]["accuracy"]


def test_gradcam_graph_agrees_with_the_classifier(shipped: OnnxModel) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((4, *shipped.spec.input_shape), dtype=np.float32)
    probs = shipped.predict(x)
    out = shipped.gradcam(x)
    np.testing.assert_allclose(out.probabilities, probs, atol=1e-5)
    np.testing.assert_array_equal(out.class_index, probs.argmax(axis=1))
    h, w, c = shipped.spec.explanation.activation_shape
    assert out.activations.shape == out.gradients.shape == (4, h, w, c)


def test_reaches_its_recorded_test_accuracy_through_the_service() -> None:
    """The recorded test split, rendered again from dataset.json's parameters (the
    generator is deterministic per image), classified by the service's /predict."""
    demo_data = pytest.importorskip("trainer.demo_data", reason="needs the `train` extra")
    pytest.importorskip("nilearn", reason="the demo images are rendered from nilearn's template")
    from service.core.config import Settings

    spec = load_spec(SHIPPED, verify=False)
    data = spec.provenance["dataset"]
    assert tuple(data["classes"]) == demo_data.CLASSES
    testing = demo_data.SPLITS.index("Testing")
    correct = total = 0
    with ready_client(Settings(model_dir=SHIPPED, providers=[CPU])) as client:
        for class_id, cls in enumerate(data["classes"]):
            for index in range(data["test_per_class"]):
                image, _, _ = demo_data.render_sample(
                    (data["seed"], testing, class_id, index), cls, data["size"]
                )
                r = client.post("/predict", files={"file": ("x.png", encode_png(image))})
                assert r.status_code == 200, r.text
                # Every answer says the model never saw a real scan.
                assert r.json()["model"]["notice"] == spec.notice
                correct += r.json()["label"] == cls
                total += 1
    recorded = spec.provenance["test_metrics"]
    assert total == recorded["test_size"]
    assert abs(correct / total - recorded["accuracy"]) <= 0.005


def test_make_model_records_provenance(
    tiny_run: Path, tiny_model_dir: Path, demo_data: Path, tmp_path: Path
) -> None:
    """The last step of `make model` (trainer.build_demo) on the tests' tiny run: what
    the shipped model's model.json and run/ folder were written by."""
    import shutil

    from trainer.build_demo import DEMO_NOTICE, RUN_FILES, record_provenance

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    record_provenance(model_dir, tiny_run, demo_data, epochs=2)
    spec = load_spec(model_dir)  # graphs untouched: their sha256s still match
    assert spec.notice == DEMO_NOTICE
    made = spec.provenance
    run = json.loads((tiny_run / "run.json").read_text())
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert made["seed"] == run["seed"] and made["epochs"] == 2
    assert made["test_metrics"]["accuracy"] == metrics["accuracy"]
    assert made["dataset"]["size"] == json.loads((demo_data / "dataset.json").read_text())["size"]
    quality = made["explanation_quality"]["methods"]["gradcam"]
    assert 0.0 <= quality["pointing_game"] <= 1.0
    json.dumps(made, allow_nan=False)  # strict JSON: no NaN
    for name in RUN_FILES:
        assert (model_dir / "run" / name).is_file(), name
