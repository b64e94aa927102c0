"""The trainer: a tiny run writes every artefact with a valid schema, is reproducible,
tunes a binary threshold, builds backbones offline, and fails cleanly on bad data."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from braincam import DISCLAIMER  # noqa: E402
from braincam.datasets import BINARY_LABELS, MULTICLASS_LABELS, DatasetError  # noqa: E402
from braincam.decoding import load_image  # noqa: E402
from braincam.preprocessing import Preprocessing  # noqa: E402
from braincam.splits import stratified_split  # noqa: E402
from trainer import cli  # noqa: E402
from trainer.errors import WeightsError  # noqa: E402
from trainer.evaluate import youden_threshold  # noqa: E402
from trainer.model import CNN_HEADS, DEFAULT_CNN_HEAD, build_model  # noqa: E402
from trainer.pipeline import augmenter  # noqa: E402
from trainer.train import TrainConfig, train  # noqa: E402

TINY = 64
ARTEFACTS = ("model.keras", "run.json", "metrics.json", "history.csv", "training_curves.png",
             "confusion_matrix.png", "roc.png", "MODEL_CARD.md")


def _metrics_without_time(path: Path) -> dict:
    metrics = json.loads(path.read_text())
    metrics.pop("training_time_seconds")
    return metrics


def test_run_writes_every_artefact(tiny_run: Path) -> None:
    for name in ARTEFACTS:
        assert (tiny_run / name).is_file(), name
    run = json.loads((tiny_run / "run.json").read_text())
    prep = Preprocessing.model_validate(run["preprocessing"])  # extra="forbid": exact schema
    assert prep == Preprocessing(height=TINY, width=TINY, channels=1, scale="unit")
    assert run["labels"] == list(MULTICLASS_LABELS) and run["task"] == "multiclass"
    assert run["arch"] == "cnn" and run["explain_layer"] == "block4_relu"
    assert run["seed"] == 0 and run["decision"] is None
    counts = run["image_counts"]
    assert sum(counts["train"].values()) + sum(counts["validation"].values()) == 48
    assert counts["test"] == dict.fromkeys(MULTICLASS_LABELS, 6)
    assert {"tensorflow", "keras", "numpy", "python"} <= set(run["versions"])


def test_metrics_schema(tiny_run: Path) -> None:
    m = json.loads((tiny_run / "metrics.json").read_text())
    assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["macro_f1"] <= 1.0
    assert m["test_size"] == 24 and m["labels"] == list(MULTICLASS_LABELS)
    assert set(m["per_class"]) == set(MULTICLASS_LABELS)
    for row in m["per_class"].values():
        assert set(row) == {"precision", "recall", "f1", "support"}
        assert isinstance(row["support"], int)
    for avg in ("macro_avg", "weighted_avg"):
        assert set(m[avg]) == {"precision", "recall", "f1"}
    assert set(m["roc_auc"]["per_class"]) == set(MULTICLASS_LABELS)
    assert isinstance(m["roc_auc"]["macro"], float)
    cm = np.asarray(m["confusion_matrix"]["matrix"])
    assert cm.shape == (4, 4) and cm.sum() == 24
    assert m["confusion_matrix"]["labels"] == list(MULTICLASS_LABELS)
    assert m["skipped_files"] == {"training": 0, "testing": 0}
    assert 1 <= m["best_epoch"] <= m["epochs_run"] == 2
    assert m["training_time_seconds"] > 0
    assert {"tensorflow", "keras", "numpy", "python"} <= set(m["versions"])
    with (tiny_run / "history.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and {"loss", "val_loss", "accuracy", "val_accuracy"} <= set(rows[0])


def test_plots_and_model_card(tiny_run: Path) -> None:
    for name in ("training_curves.png", "confusion_matrix.png", "roc.png"):
        pixels = load_image(tiny_run / name)
        assert pixels.ndim == 3 and min(pixels.shape[:2]) > 200
    card = (tiny_run / "MODEL_CARD.md").read_text()
    assert DISCLAIMER in card
    for heading in ("## Intended use", "## Data", "## Metrics", "## Known limits"):
        assert heading in card
    assert "synthetic demo dataset" in card  # the demo dataset's dataset.json is detected


def test_saved_model_is_augmentation_free(tiny_run: Path) -> None:
    model = keras.models.load_model(tiny_run / "model.keras", compile=False)
    assert not [layer for layer in model.layers if type(layer).__name__.startswith("Random")]
    assert not [layer for layer in model.layers if type(layer).__name__ == "Rescaling"]
    assert tuple(model.input_shape[1:]) == (TINY, TINY, 1)
    probs = model.predict(np.zeros((2, TINY, TINY, 1), np.float32), verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_same_seed_same_metrics(demo_data: Path, tiny_run: Path, tmp_path: Path) -> None:
    # The same configuration as the session's tiny run (tests/conftest.py).
    result = train(TrainConfig(data=demo_data, out=tmp_path / "again", img_size=TINY, epochs=2,
                               batch_size=16, seed=0, verbose=0))
    assert _metrics_without_time(result.run_dir / "metrics.json") == _metrics_without_time(
        tiny_run / "metrics.json")


def test_binary_threshold(demo_data: Path, tmp_path: Path) -> None:
    result = train(TrainConfig(data=demo_data, out=tmp_path / "bin", task="binary",
                               img_size=TINY, epochs=1, batch_size=16, seed=1, verbose=0))
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["labels"] == list(BINARY_LABELS)
    decision = run["decision"]
    assert decision["positive_label"] == "tumor" and decision["threshold_method"] == "youden_j"
    assert 0.0 <= decision["threshold"] <= 1.0
    m = result.metrics
    assert m["threshold"] == decision["threshold"]
    assert 0.0 <= m["sensitivity"] <= 1.0 and 0.0 <= m["specificity"] <= 1.0
    assert np.asarray(m["confusion_matrix"]["matrix"]).shape == (2, 2)


def test_youden_threshold() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    score = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    t = youden_threshold(y == 1, score)
    assert 0.3 < t <= 0.6  # separates the classes perfectly, inside the gap
    assert youden_threshold(np.ones(3, bool), np.array([0.2, 0.5, 0.9])) == 0.5


def test_stratified_split() -> None:
    y = np.repeat(np.arange(4), 10)
    train_idx, val_idx = stratified_split(y, 0.15, seed=0, num_classes=4)
    assert len(set(train_idx) | set(val_idx)) == 40 and not set(train_idx) & set(val_idx)
    assert set(y[val_idx]) == {0, 1, 2, 3}
    again = stratified_split(y, 0.15, seed=0, num_classes=4)
    assert np.array_equal(val_idx, again[1])
    with pytest.raises(DatasetError):
        stratified_split(np.array([0, 1, 1, 1]), 0.15, seed=0, num_classes=2)


def test_augmentation_stays_in_range() -> None:
    x = np.random.default_rng(0).uniform(0, 1, (4, 32, 32, 1)).astype(np.float32)
    out = np.asarray(augmenter("unit", 0)(x))
    assert out.shape == x.shape and out.min() >= 0.0 and out.max() <= 1.0
    assert not np.allclose(out, x)


def test_batchnorm_recalibration_matches_the_data() -> None:
    from trainer.callbacks import RecalibrateBatchNorm

    inputs = keras.Input((8, 8, 1))
    outputs = keras.layers.BatchNormalization(name="bn")(inputs)
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(0).normal(3.0, 2.0, (200, 8, 8, 1)).astype(np.float32)
    callback = RecalibrateBatchNorm(x, seed=0, limit=128, chunk=32)
    callback.set_model(model)
    callback.recalibrate()
    bn = model.get_layer("bn")
    assert abs(float(bn.moving_mean.numpy()[0]) - 3.0) < 0.1
    assert abs(float(bn.moving_variance.numpy()[0]) - 4.0) < 0.3
    assert bn.momentum == 0.99  # restored


@pytest.mark.parametrize(
    ("head", "pooling"),
    [("max", keras.layers.GlobalMaxPooling2D), ("gap", keras.layers.GlobalAveragePooling2D),
     ("flatten", keras.layers.Flatten)],
)
def test_cnn_heads(head: str, pooling: type) -> None:
    model, layer = build_model("cnn", (32, 32, 1), 4, cnn_head=head)  # type: ignore[arg-type]
    assert layer == "block4_relu"
    assert sum(isinstance(x, pooling) for x in model.layers) == 1
    assert DEFAULT_CNN_HEAD == "max"  # the measured choice (trainer/model.py)
    # The CLI lists the heads without importing TensorFlow: it must agree with the model.
    assert cli.CNN_HEADS == CNN_HEADS
    assert cli.parse_args(["--data", "d", "--out", "o"]).cnn_head == DEFAULT_CNN_HEAD


def test_weights_file_roundtrip(tmp_path: Path) -> None:
    source, _ = build_model("cnn", (32, 32, 1), 4)
    path = tmp_path / "cnn.weights.h5"
    source.save_weights(path)
    target, _ = build_model("cnn", (32, 32, 1), 4, weights=path)
    for a, b in zip(source.get_weights(), target.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(WeightsError):
        build_model("cnn", (32, 32, 1), 4, weights=tmp_path / "missing.weights.h5")


def test_backbone_builds_offline(demo_data: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("the trainer must never download weights")

    monkeypatch.setattr(keras.utils, "get_file", no_download)
    import keras.src.utils.file_utils as file_utils

    monkeypatch.setattr(file_utils, "get_file", no_download)
    result = train(TrainConfig(data=demo_data, out=tmp_path / "mnv2", arch="MobileNetV2",
                               img_size=32, epochs=1, batch_size=16, verbose=0))
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["preprocessing"]["channels"] == 3 and run["preprocessing"]["scale"] == "symmetric"
    model = keras.models.load_model(result.model_path, compile=False)
    assert run["explain_layer"] in {layer.name for layer in model.layers}
    assert len(model.get_layer(run["explain_layer"]).output.shape) == 4


def test_backbone_needs_three_channels(demo_data: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["--data", str(demo_data), "--out", str(tmp_path / "x"),
                   "--arch", "MobileNetV2", "--channels", "1"])
    assert rc == 2
    assert "needs --channels 3" in capsys.readouterr().err


def _cli_error(capsys: pytest.CaptureFixture[str], data: Path, out: Path) -> str:
    rc = cli.main(["--data", str(data), "--out", str(out), "--epochs", "1", "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert not (out / "model.keras").exists()
    return err


def test_cli_missing_data_dir(tmp_path: Path) -> None:
    # The real entry point, in a subprocess: exit status and a one-line message.
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "--data", str(tmp_path / "nope"),
         "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"error: data directory {tmp_path / 'nope'} does not exist" in proc.stderr


def test_cli_empty_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert "no 'Training/' folder" in _cli_error(capsys, tmp_path / "empty", tmp_path / "run")


def test_cli_empty_class_folder(demo_data: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    for split in ("Training", "Testing"):
        shutil.copytree(demo_data / split, data / split)
    for f in (data / "Testing" / "pituitary").iterdir():
        f.unlink()  # an empty class folder in Testing/ must fail before training starts
    err = _cli_error(capsys, data, tmp_path / "run")
    assert "pituitary" in err and "holds no images" in err


def test_build_demo_skips_a_valid_model(tiny_model_dir: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from trainer import build_demo

    rc = build_demo.main(["--out", str(tiny_model_dir), "--data", str(tmp_path / "unused")])
    assert rc == 0
    assert "already exists" in capsys.readouterr().out
    assert not (tmp_path / "unused").exists()


def test_build_demo_refuses_a_foreign_data_dir(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from trainer import build_demo

    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a dataset")
    rc = build_demo.main(["--data", str(foreign), "--out", str(tmp_path / "model"),
                          "--runs", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err
    assert (foreign / "notes.txt").is_file() and not (tmp_path / "model").exists()
