"""Training curves, confusion matrix and ROC curves as PNGs (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display in containers or CI

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

DPI = 110


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def training_curves(history: dict[str, list[float]], path: Path) -> Path:
    """Loss and accuracy per epoch, train vs validation."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    for ax, key, title in ((axes[0], "loss", "Loss"), (axes[1], "accuracy", "Accuracy")):
        for prefix, name in (("", "train"), ("val_", "validation")):
            values = history.get(prefix + key)
            if values:
                ax.plot(epochs, values, marker="o", markersize=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    if history.get("val_loss"):
        best = int(np.argmin(history["val_loss"])) + 1
        for ax in axes:
            ax.axvline(best, color="grey", linestyle="--", linewidth=1)
    return _save(fig, path)


def confusion(matrix: list[list[int]], labels: list[str], path: Path) -> Path:
    """Counts, coloured by the row-normalised rate (recall per true class)."""
    cm = np.asarray(matrix, dtype=float)
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 1.1 * len(labels) + 2))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(labels)):
        for j in range(len(labels)):
            colour = "white" if rates[i, j] > 0.5 else "black"
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", color=colour)
    ax.set_title("Confusion matrix (test set)")
    return _save(fig, path)


def roc(y_true: np.ndarray, probs: np.ndarray, labels: list[str], path: Path,
        metrics: dict[str, Any]) -> Path:
    """One-vs-rest ROC per class; the binary threshold's operating point is marked."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    aucs = metrics["roc_auc"]["per_class"]
    binary = metrics["task"] == "binary"
    shown = [labels.index(metrics["positive_label"])] if binary else range(len(labels))
    for i in shown:
        positive = y_true == i
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, i])
        ax.plot(fpr, tpr, label=f"{labels[i]} (AUC {aucs[labels[i]]:.3f})")
    if binary and metrics.get("sensitivity") is not None and metrics.get("specificity") is not None:
        ax.plot(1 - metrics["specificity"], metrics["sensitivity"], "ko",
                label=f"threshold {metrics['threshold']:.3f}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC (test set, one-vs-rest)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def reliability(calibration: dict[str, Any], path: Path) -> Path:
    """Reliability diagram of the test set: accuracy vs confidence per bin, before and
    after temperature scaling (bar width = bin, the diagonal = perfect calibration)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    test = calibration["test"]
    titles = {
        "before": f"uncalibrated (ECE {test['ece_before']:.3f})",
        "after": f"T = {calibration['temperature']:.2f} (ECE {test['ece_after']:.3f})",
    }
    for ax, key in zip(axes, ("before", "after"), strict=True):
        bins = calibration["reliability_test"][key]
        lows = [b["low"] for b in bins]
        width = bins[0]["high"] - bins[0]["low"] if bins else 1.0
        ax.bar(lows, [b["accuracy"] for b in bins], width=width, align="edge",
               edgecolor="black", alpha=0.75, label="accuracy")
        # The bin's mean confidence over its bar: the gap to the bar top is the error.
        ax.plot([(b["low"] + b["high"]) / 2 for b in bins], [b["confidence"] for b in bins],
                "_", color="C3", markersize=12, markeredgewidth=2, label="mean confidence")
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (probability of the predicted class)")
        ax.set_title(titles[key])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    return _save(fig, path)
