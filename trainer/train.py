"""Train one model on a Kaggle-layout dataset and write a complete run directory.

    runs/NAME/ model.keras run.json metrics.json history.csv training_curves.png
               confusion_matrix.png roc.png MODEL_CARD.md

Images go through `braincam.datasets` -> `braincam.preprocessing.preprocess`, the
same function the service calls, so training and serving inputs are byte-identical.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from braincam.calibration import softmax
from braincam.datasets import (
    POSITIVE_LABEL,
    LoadedSplit,
    Split,
    Task,
    find_split_dir,
    labels_for,
    load_split,
    scan_split,
)
from braincam.preprocessing import Preprocessing
from braincam.splits import stratified_split
from trainer import calibrate, evaluate, model_card, pipeline, plots
from trainer.callbacks import RecalibrateBatchNorm
from trainer.demo_data import DATASET_JSON
from trainer.errors import ConfigError
from trainer.model import (
    ARCHS,
    CNN,
    CNN_HEADS,
    DEFAULT_CNN_HEAD,
    MIN_IMG_SIZE,
    CnnHead,
    build_model,
    default_channels,
    default_scale,
)

log = logging.getLogger(__name__)

# Early stopping (patience 5 on val_loss) ends runs sooner once they plateau; the
# demo model uses fewer to fit its time budget (build_demo.DEMO_EPOCHS).
DEFAULT_EPOCHS = 30
DEFAULT_BATCH_SIZE = 32
EARLY_STOP_PATIENCE = 5
LR_PATIENCE = 3
LR_FACTOR = 0.3
MIN_LR = 1e-6


@dataclass
class TrainConfig:
    data: Path
    out: Path
    task: Task = "multiclass"
    arch: str = CNN
    weights: Path | None = None
    img_size: int = 150
    channels: int | None = None  # None: 1 for the CNN, 3 for ImageNet backbones
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0
    val_split: float = 0.15
    learning_rate: float = 1e-3
    export: Path | None = None
    verbose: int | str = 1  # Keras fit verbosity: 0 silent, 1 progress bar, 2 one line/epoch
    cnn_head: CnnHead = DEFAULT_CNN_HEAD

    def __post_init__(self) -> None:
        self.data, self.out = Path(self.data), Path(self.out)
        self.weights = Path(self.weights) if self.weights is not None else None
        self.export = Path(self.export) if self.export is not None else None
        if self.channels is None:
            self.channels = default_channels(self.arch)

    def validate(self) -> None:
        problems = []
        if self.task not in ("multiclass", "binary"):
            problems.append(f"task must be multiclass or binary, not '{self.task}'")
        if self.arch not in ARCHS:
            problems.append(f"arch must be one of {', '.join(ARCHS)}, not '{self.arch}'")
        elif self.arch != CNN and self.channels != 3:
            problems.append(f"{self.arch} needs --channels 3 (ImageNet stems are RGB)")
        if self.channels not in (1, 3):
            problems.append("channels must be 1 or 3")
        if not MIN_IMG_SIZE <= self.img_size <= 1024:
            problems.append(f"img-size must be between {MIN_IMG_SIZE} and 1024")
        if self.epochs < 1 or self.batch_size < 1:
            problems.append("epochs and batch-size must be at least 1")
        if not 0.0 < self.val_split < 0.5:
            problems.append("val-split must be between 0 and 0.5")
        if not 0.0 < self.learning_rate < 1.0:
            problems.append("lr must be between 0 and 1")
        if self.cnn_head not in CNN_HEADS:
            problems.append(f"cnn head must be one of {', '.join(CNN_HEADS)}")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(height=self.img_size, width=self.img_size,
                             channels=self.channels,  # type: ignore[arg-type]
                             scale=default_scale(self.arch))


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, Any]
    model_path: Path
    model_dir: Path | None = None
    explain_layer: str = ""
    seconds: float = 0.0
    artefacts: dict[str, Path] = field(default_factory=dict)


def dataset_info(data: Path) -> dict[str, Any] | None:
    """DIR/dataset.json, written by the demo-data builder (marks synthetic data)."""
    path = data / DATASET_JSON
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"file": DATASET_JSON, "unreadable": True}
    return info if isinstance(info, dict) else {"content": info}


def _counts(y: np.ndarray, labels: list[str]) -> dict[str, int]:
    n = np.bincount(y, minlength=len(labels))
    return {label: int(n[i]) for i, label in enumerate(labels)}


def _scan(config: TrainConfig) -> tuple[Split, Split]:
    # Both splits are scanned before any work, so an empty class folder in Testing/
    # fails in a second, not after training.
    training = scan_split(find_split_dir(config.data, "Training"), config.task)
    testing = scan_split(find_split_dir(config.data, "Testing"), config.task)
    return training, testing


def _fit(config: TrainConfig, model: keras.Model, run_dir: Path, loaded: LoadedSplit,
         train_idx: np.ndarray, val_idx: np.ndarray, labels: list[str]) -> keras.callbacks.History:
    prep = config.preprocessing
    train_ds = pipeline.make_dataset(
        loaded.x[train_idx], loaded.y[train_idx], config.batch_size,
        shuffle_seed=config.seed, augment=pipeline.augmenter(prep.scale, config.seed),
    )
    val_ds = pipeline.make_dataset(loaded.x[val_idx], loaded.y[val_idx], config.batch_size)
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    callbacks = [
        # First: the checkpoint, early stopping and the LR schedule judge the epoch by
        # validation figures computed with recalibrated BatchNorm statistics.
        RecalibrateBatchNorm(loaded.x[train_idx], seed=config.seed),
        keras.callbacks.ModelCheckpoint(run_dir / "model.keras", monitor="val_loss",
                                        save_best_only=True),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=EARLY_STOP_PATIENCE,
                                      restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=LR_FACTOR,
                                          patience=LR_PATIENCE, min_lr=MIN_LR),
        keras.callbacks.CSVLogger(str(run_dir / "history.csv")),
    ]
    return model.fit(
        train_ds, validation_data=val_ds, epochs=config.epochs, callbacks=callbacks,
        class_weight=pipeline.class_weights(loaded.y[train_idx], len(labels)),
        shuffle=False,  # the tf.data pipeline shuffles, seeded
        verbose=config.verbose,
    )


def train(config: TrainConfig) -> TrainResult:
    """Load, split, train, evaluate on Testing/, write the run directory, optionally export."""
    config.validate()
    started = time.perf_counter()
    # Same seed -> same metrics: seeds Python, NumPy and TF, and makes TF pick
    # deterministic kernels (and run tf.data's random ops in a fixed order).
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()

    labels = list(labels_for(config.task))
    prep = config.preprocessing
    training, testing = _scan(config)
    log.info("loading %d training images at %dx%dx%d", len(training.paths), *prep.input_shape)
    loaded = load_split(training, prep)
    train_idx, val_idx = stratified_split(
        loaded.y, config.val_split, config.seed, len(labels))

    run_dir = config.out
    run_dir.mkdir(parents=True, exist_ok=True)
    model, explain_layer = build_model(config.arch, prep.input_shape, len(labels),
                                       weights=config.weights, cnn_head=config.cnn_head)
    log.info("training %s (%s params) on %d images, validating on %d",
             model.name, f"{model.count_params():,}", len(train_idx), len(val_idx))
    fit_started = time.perf_counter()
    history = _fit(config, model, run_dir, loaded, train_idx, val_idx, labels).history
    fit_seconds = time.perf_counter() - fit_started
    model_path = run_dir / "model.keras"
    model.save(model_path)  # the best epoch's weights (restored by EarlyStopping)

    log.info("evaluating on %d test images", len(testing.paths))
    test = load_split(testing, prep)
    # Temperature scaling fitted on the validation split; every figure below is of the
    # calibrated probabilities the exported graphs serve (argmax and AUCs are unchanged).
    val_logits = calibrate.model_logits(model, explain_layer, loaded.x[val_idx],
                                        config.batch_size)
    test_logits = calibrate.model_logits(model, explain_layer, test.x, config.batch_size)
    calibration = calibrate.calibrate(val_logits, loaded.y[val_idx], test_logits, test.y)
    temperature = calibration["temperature"]
    val_probs = softmax(val_logits, temperature)
    probs = softmax(test_logits, temperature)
    decision = None
    threshold = None
    if config.task == "binary":
        pos = labels.index(POSITIVE_LABEL)
        threshold = evaluate.youden_threshold(loaded.y[val_idx] == pos, val_probs[:, pos])
        decision = {"positive_label": POSITIVE_LABEL, "threshold": threshold,
                    "threshold_method": evaluate.YOUDEN}  # on calibrated probabilities
    val_acc = float(np.mean(evaluate.predict_labels(val_probs, labels, threshold)
                            == loaded.y[val_idx]))
    metrics = evaluate.compute_metrics(test.y, probs, labels, config.task, threshold)
    val_losses = np.asarray(history.get("val_loss") or [np.nan], dtype=float)
    best_epoch = int(np.nanargmin(val_losses)) + 1 if np.isfinite(val_losses).any() else 0
    metrics.update({
        "validation": {"size": len(val_idx), "accuracy": val_acc},
        "skipped_files": {"training": len(loaded.skipped), "testing": len(test.skipped)},
        "best_epoch": best_epoch,
        "epochs_run": len(history.get("loss", [])),
        "training_time_seconds": round(fit_seconds, 2),
        "versions": evaluate.versions(),
        "calibration": calibration,
    })

    run = _run_record(config, model, explain_layer, decision, loaded, test, train_idx, val_idx,
                      labels, metrics["versions"], temperature)
    artefacts = _write_artefacts(run_dir, model_path, run, metrics, history, test.y, probs)
    model_dir = None
    if config.export is not None:
        model_dir = export_run(model_path, config.export, config.data)
        artefacts["exported"] = model_dir
    return TrainResult(run_dir=run_dir, metrics=metrics, model_path=model_path,
                       model_dir=model_dir, explain_layer=explain_layer,
                       seconds=time.perf_counter() - started, artefacts=artefacts)


def _run_record(config: TrainConfig, model: keras.Model, explain_layer: str,
                decision: dict[str, Any] | None, loaded: LoadedSplit, test: LoadedSplit,
                train_idx: np.ndarray, val_idx: np.ndarray, labels: list[str],
                versions: dict[str, str], temperature: float) -> dict[str, Any]:
    """run.json: what the exporter and the model card need to know about this run."""
    return {
        "name": config.out.name,
        "task": config.task,
        "labels": labels,
        "preprocessing": config.preprocessing.model_dump(),
        "decision": decision,
        "arch": config.arch,
        "cnn_head": config.cnn_head if config.arch == CNN else None,
        "explain_layer": explain_layer,
        "seed": config.seed,
        "data": str(config.data.resolve()),
        "dataset": dataset_info(config.data),
        "image_counts": {
            "train": _counts(loaded.y[train_idx], labels),
            "validation": _counts(loaded.y[val_idx], labels),
            "test": _counts(test.y, labels),
        },
        "skipped": [{"path": str(p), "reason": r}
                    for p, r in (loaded.skipped + test.skipped)[:100]],
        "params": int(model.count_params()),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "augmentation": pipeline.augmentation_summary(),
        "calibration": {"method": "temperature", "temperature": temperature,
                        "fit_size": len(val_idx)},
        "versions": versions,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _write_artefacts(run_dir: Path, model_path: Path, run: dict[str, Any],
                     metrics: dict[str, Any], history: dict[str, list[float]],
                     y_test: np.ndarray, probs: np.ndarray) -> dict[str, Path]:
    labels = run["labels"]
    artefacts = {"model": model_path}
    artefacts["run"] = _write_json(run_dir / "run.json", run)
    artefacts["metrics"] = _write_json(run_dir / "metrics.json", metrics)
    artefacts["history"] = run_dir / "history.csv"
    artefacts["training_curves"] = plots.training_curves(history, run_dir / "training_curves.png")
    artefacts["confusion_matrix"] = plots.confusion(
        metrics["confusion_matrix"]["matrix"], labels, run_dir / "confusion_matrix.png")
    artefacts["roc"] = plots.roc(y_test, probs, labels, run_dir / "roc.png", metrics)
    artefacts["reliability"] = plots.reliability(metrics["calibration"],
                                                 run_dir / "reliability.png")
    artefacts["model_card"] = run_dir / model_card.FILENAME
    artefacts["model_card"].write_text(model_card.render(run, metrics))
    return artefacts


def export_run(model_path: Path, out_dir: Path, data: Path) -> Path:
    """Hand a trained model to the exporter (ONNX graphs + model.json, parity-gated)."""
    from exporter.export import export_model  # lazily: training alone needs no ONNX stack

    log.info("exporting %s to %s", model_path, out_dir)
    export_model(model_path, out_dir, calibration=find_split_dir(data, "Testing"))
    return out_dir


def _write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    return path
