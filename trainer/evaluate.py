"""Test-set metrics and the binary decision threshold."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from braincam.datasets import POSITIVE_LABEL

YOUDEN = "youden_j"


def versions() -> dict[str, str]:
    """Versions that decide whether a run can be reproduced."""
    out = {"python": platform.python_version()}
    for dist, key in (("tensorflow", "tensorflow"), ("tensorflow-cpu", "tensorflow"),
                      ("keras", "keras"), ("numpy", "numpy"), ("scikit-learn", "scikit-learn"),
                      ("braincam", "braincam")):
        try:
            out.setdefault(key, metadata.version(dist))
        except metadata.PackageNotFoundError:
            continue
    return out


def youden_threshold(is_positive: np.ndarray, score: np.ndarray) -> float:
    """Threshold on p(positive) maximising sensitivity + specificity - 1 (Youden's J).

    Predict positive when score >= threshold (as braincam.decision does). J is flat
    between two neighbouring scores, so we take the midpoint of the best interval
    rather than its edge, which sits exactly on a validation image.
    """
    is_positive = np.asarray(is_positive, dtype=bool)
    if is_positive.all() or not is_positive.any():
        return 0.5  # J is undefined with one class; fall back to the argmax rule
    fpr, tpr, thresholds = roc_curve(is_positive, score)
    best = int(np.argmax(tpr - fpr))
    upper = float(min(thresholds[best], 1.0))
    lower = float(thresholds[best + 1]) if best + 1 < len(thresholds) else 0.0
    return float(np.clip((upper + lower) / 2.0, 0.0, 1.0))


def predict_labels(
    probs: np.ndarray, labels: list[str], threshold: float | None = None
) -> np.ndarray:
    """argmax, or for a binary model the tuned threshold on p(positive)."""
    if threshold is None:
        return np.argmax(probs, axis=1)
    pos = labels.index(POSITIVE_LABEL)
    return np.where(probs[:, pos] >= threshold, pos, 1 - pos)


def _auc(y_true: np.ndarray, score: np.ndarray) -> float | None:
    return float(roc_auc_score(y_true, score)) if 0 < y_true.sum() < len(y_true) else None


def compute_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    labels: list[str],
    task: str,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Everything metrics.json reports about the test set (run facts are added later)."""
    k = len(labels)
    y_pred = predict_labels(probs, labels, threshold)
    classes = list(range(k))
    p, r, f, s = precision_recall_fscore_support(
        y_true, y_pred, labels=classes, zero_division=0
    )
    per_class = {
        label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                "support": int(s[i])}
        for i, label in enumerate(labels)
    }

    def average(kind: str) -> dict[str, float]:
        ap, ar, af, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=classes, average=kind, zero_division=0
        )
        return {"precision": float(ap), "recall": float(ar), "f1": float(af)}

    aucs = {label: _auc((y_true == i).astype(int), probs[:, i]) for i, label in enumerate(labels)}
    defined = [v for v in aucs.values() if v is not None]
    cm = confusion_matrix(y_true, y_pred, labels=classes)
    out: dict[str, Any] = {
        "task": task,
        "labels": list(labels),
        "test_size": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": average("macro")["f1"],
        "per_class": per_class,
        "macro_avg": average("macro"),
        "weighted_avg": average("weighted"),
        "roc_auc": {"per_class": aucs, "macro": float(np.mean(defined)) if defined else None},
        "confusion_matrix": {"labels": list(labels), "matrix": cm.astype(int).tolist(),
                             "rows": "true", "columns": "predicted"},
    }
    if task == "binary":
        pos = labels.index(POSITIVE_LABEL)
        tp, fn = int(cm[pos, pos]), int(cm[pos, 1 - pos])
        tn, fp = int(cm[1 - pos, 1 - pos]), int(cm[1 - pos, pos])
        out["positive_label"] = POSITIVE_LABEL
        out["threshold"] = threshold
        out["sensitivity"] = tp / (tp + fn) if tp + fn else None
        out["specificity"] = tn / (tn + fp) if tn + fp else None
    return out
