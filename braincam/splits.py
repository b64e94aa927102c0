"""The seeded, stratified train/validation split of a training set.

The trainer splits with it, and the exporter re-derives the same split from a trainer
run's seed (exporter/fit_data.py): both must get the same indices, so it lives here,
below both. scikit-learn is imported when a split is made: the train and onnx extras
bring it; the service never splits.
"""

from __future__ import annotations

import math

import numpy as np

from braincam.datasets import DatasetError


def stratified_split(
    y: np.ndarray, val_split: float, seed: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val), stratified by class and seeded."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y, minlength=num_classes)
    if counts.min() < 2:
        raise DatasetError(
            "every class needs at least 2 training images for a stratified validation split"
        )
    # At least one validation image per class, however small the dataset.
    n_val = max(math.ceil(val_split * len(y)), num_classes)
    if len(y) - n_val < num_classes:
        raise DatasetError(f"too few training images ({len(y)}) for a validation split")
    idx = np.arange(len(y))
    train_idx, val_idx = train_test_split(idx, test_size=n_val, stratify=y, random_state=seed)
    return np.sort(train_idx), np.sort(val_idx)
