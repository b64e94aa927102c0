"""MODEL_CARD.md: intended use, data, architecture, metrics and known limits of one run."""

from __future__ import annotations

from typing import Any

from braincam import DISCLAIMER

FILENAME = "MODEL_CARD.md"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _is_synthetic(dataset: dict[str, Any] | None) -> bool:
    if not dataset:
        return False
    text = " ".join(str(dataset.get(k, "")) for k in ("synthetic", "kind", "name", "description"))
    return dataset.get("synthetic") is not False and (
        "synthetic" in text.lower() or "demo" in text.lower() or dataset.get("synthetic") is True
    )


def _data_section(run: dict[str, Any], metrics: dict[str, Any]) -> str:
    counts = run["image_counts"]
    rows = [[label, counts["train"][label], counts["validation"][label], counts["test"][label]]
            for label in run["labels"]]
    rows.append(["**total**", *(sum(counts[s].values()) for s in ("train", "validation", "test"))])
    skipped = metrics.get("skipped_files", {})
    parts = [
        f"Data directory: `{run['data']}` (Kaggle layout: `Training/`, `Testing/`, class folders).",
        "The validation set is a stratified, seeded split of `Training/`; `Testing/` is used "
        "once, for the metrics below.",
        "",
        _table(["class", "train", "validation", "test"], rows),
        "",
        f"Unreadable or non-image files skipped: {skipped.get('training', 0)} in Training, "
        f"{skipped.get('testing', 0)} in Testing.",
    ]
    dataset = run.get("dataset")
    if _is_synthetic(dataset):
        parts += [
            "",
            "**This run used the synthetic demo dataset** (`dataset.json` in the data "
            "directory): generated images, not patient data. Its metrics show that the "
            "pipeline works end to end; they say nothing about performance on real MRI.",
        ]
        if dataset and dataset.get("note"):
            parts += ["", f"Dataset note: {dataset['note']}"]
    elif dataset:
        parts += ["", f"`dataset.json`: {_fmt(dataset.get('description') or dataset)}"]
    return "\n".join(parts)


def _metrics_section(metrics: dict[str, Any]) -> str:
    aucs = metrics["roc_auc"]["per_class"]
    rows = [[label, m["precision"], m["recall"], m["f1"], aucs.get(label), m["support"]]
            for label, m in metrics["per_class"].items()]
    for name, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
        avg = metrics[key]
        auc = metrics["roc_auc"]["macro"] if key == "macro_avg" else None
        rows.append([name, avg["precision"], avg["recall"], avg["f1"], auc, metrics["test_size"]])
    lines = [
        f"Test set: {metrics['test_size']} images. **Accuracy {metrics['accuracy']:.3f}**, "
        f"macro F1 {metrics['macro_f1']:.3f}, macro one-vs-rest ROC AUC "
        f"{_fmt(metrics['roc_auc']['macro'])}.",
        "",
        _table(["class", "precision", "recall", "F1", "ROC AUC", "support"], rows),
    ]
    if metrics["task"] == "binary":
        lines += [
            "",
            f"Binary decision: `{metrics['positive_label']}` when p({metrics['positive_label']}) "
            f">= {_fmt(metrics['threshold'])} (Youden's J on the validation set). "
            f"Sensitivity {_fmt(metrics['sensitivity'])}, specificity "
            f"{_fmt(metrics['specificity'])}.",
        ]
    lines += [
        "",
        f"Best epoch {metrics['best_epoch']} of {metrics['epochs_run']} "
        f"(validation loss; early stopping); training time "
        f"{metrics['training_time_seconds']:.0f} s. Plots: `training_curves.png`, "
        "`confusion_matrix.png`, `roc.png`.",
    ]
    return "\n".join(lines)


def _calibration_section(metrics: dict[str, Any]) -> str:
    cal = metrics.get("calibration")
    if not cal:
        return "No temperature scaling was applied."
    rows = [[split, f["ece_before"], f["ece_after"], f["brier_before"], f["brier_after"]]
            for split, f in (("validation (fit)", cal["validation"]), ("test", cal["test"]))]
    bound = (" (the validation split is classified perfectly, so it cannot say how sharp "
             "the probabilities should be: the model's own scale is kept)") if (
        cal.get("at_bound")) else ""
    return "\n".join([
        f"Temperature scaling on the validation split ({cal['fit_size']} images): "
        f"T = {cal['temperature']:.3f}{bound}. Expected calibration error "
        f"({cal['ece_bins']} bins) and Brier score, before and after:",
        "",
        _table(["split", "ECE before", "ECE after", "Brier before", "Brier after"], rows),
        "",
        "Reliability diagram (test set): `reliability.png`.",
    ])


_POOLING = {"gap": "global average pooling", "max": "global max pooling"}


def _architecture_section(run: dict[str, Any]) -> str:
    cfg = run["config"]
    prep = run["preprocessing"]
    if run["arch"] == "cnn":
        arch = (
            "Small CNN: four Conv3x3-BatchNorm-ReLU-MaxPool blocks (32/64/128/256 filters), "
            f"{_POOLING.get(run.get('cnn_head', ''), 'flatten')}, "
            "Dropout 0.5, Dense 256 ReLU, Dropout 0.3, softmax."
        )
    else:
        arch = (f"keras.applications `{run['arch']}` backbone + global average pooling, "
                "Dropout, softmax.")
        arch += f" Initial weights: `{cfg['weights']}`." if cfg.get("weights") else (
            " Trained from random initialisation.")
    aug = run.get("augmentation", {})
    return "\n".join([
        arch,
        f"Parameters: {run['params']:,}. Grad-CAM explains layer `{run['explain_layer']}`.",
        "",
        f"Input: {prep['height']}x{prep['width']}x{prep['channels']}, scale `{prep['scale']}`, "
        f"{prep['interpolation']} resizing (`braincam.preprocessing`, shared with the service).",
        f"Training: Adam lr {cfg['learning_rate']}, batch {cfg['batch_size']}, up to "
        f"{cfg['epochs']} epochs, early stopping (patience 5) and LR reduction on validation "
        f"loss, balanced class weights, seed {run['seed']}.",
        "Augmentation (training only, not in the model): "
        + ", ".join(f"{k} {v}" for k, v in aug.items()) + ".",
    ])


LIMITS = """\
- **Shortcut learning.** A CNN can score well by keying on acquisition artefacts,
  text, borders, scanner-specific intensity or the source a class was collected from
  rather than on the lesion. Check the Grad-CAM maps (`/explain`,
  `python -m trainer.explain_eval`) before trusting any figure here.
- **Single-slice 2-D.** The model sees one 2-D slice, without the volume, other
  sequences (T1c/T2/FLAIR) or clinical context that a radiologist uses. A slice that
  misses the lesion is "notumor" to it.
- **Dataset bias.** Public brain-tumour collections mix sources per class, contain
  near-duplicates across splits, and are neither population-representative nor
  balanced by scanner, age or sex. Test-set accuracy on such data overestimates
  performance elsewhere.
- **Calibration.** Temperature scaling (one scalar fitted on the validation split)
  makes the confidence match the accuracy *on data like the validation split*; it
  says nothing about images unlike it. A binary model's threshold is tuned on a small
  validation split.
- **Out of distribution.** The exported model carries a detector fitted on its own
  penultimate features (`ood_score`, `in_distribution` in every answer): it flags
  inputs unlike the training images, but only as well as measured
  (`python -m trainer.ood_eval`); an image that looks like the training data in
  feature space passes whatever it really is."""


def render(run: dict[str, Any], metrics: dict[str, Any]) -> str:
    name = run["name"]
    return "\n".join([
        f"# Model card: {name}",
        "",
        f"> **{DISCLAIMER}**",
        "",
        "## Intended use",
        f"Research and teaching on explainable classification of brain MRI slices "
        f"({run['task']}: {', '.join(run['labels'])}). **Research use only, not a "
        "diagnostic device**: not for diagnosis, screening, triage or any clinical decision.",
        "",
        "## Data",
        _data_section(run, metrics),
        "",
        "## Architecture and training",
        _architecture_section(run),
        "",
        "## Metrics",
        _metrics_section(metrics),
        "",
        "## Calibration",
        _calibration_section(metrics),
        "",
        "## Known limits",
        LIMITS,
        "",
        "## Export and serve",
        "```",
        f"python -m exporter --model {run['config']['out']}/model.keras --out models/{name}",
        f"BRAINCAM_MODEL_DIR=models/{name} python -m service",
        "```",
        "(or train with `--export models/NAME`). The exporter writes `classifier.onnx`, "
        "`gradcam.onnx` and `model.json` after a parity check against Keras; the service "
        "serves `/predict` and `/explain`.",
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in run['versions'].items())}. "
        f"Created {run['created_at']}.",
        "",
    ])
