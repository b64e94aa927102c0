"""Training callbacks of our own."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np


class RecalibrateBatchNorm(keras.callbacks.Callback):
    """Recompute BatchNorm's inference statistics before every validation pass.

    With ~30 steps per epoch and Adam moving the weights fast, BatchNorm's moving
    averages describe the network of several steps ago (and augmented images), not
    the current one: validation accuracy then swings between chance and the truth
    from one epoch to the next, and early stopping and the LR schedule follow noise.
    We replace them by the statistics of the *current* network on unaugmented training
    images ("precise BN"), which is also what the model sees at inference. Cost: one
    forward pass over `limit` images per epoch. Only the statistics change, no weights.
    """

    def __init__(self, x: np.ndarray, seed: int, limit: int = 128, chunk: int = 64) -> None:
        super().__init__()
        # A seeded random subset: the arrays are ordered by class, and every chunk
        # must look like a training batch.
        pick = np.random.default_rng(seed).permutation(len(x))[:limit]
        self.x = x[pick]
        self.chunk = chunk

    def recalibrate(self) -> None:
        bns = [layer for layer in self.model.layers
               if isinstance(layer, keras.layers.BatchNormalization)]
        if not bns or len(self.x) == 0:
            return
        saved = [bn.momentum for bn in bns]
        try:
            for k, start in enumerate(range(0, len(self.x), self.chunk)):
                # momentum k/(k+1): the moving statistics become the running mean of
                # the per-chunk statistics (chunk 0 overwrites the stale values).
                for bn in bns:
                    bn.momentum = k / (k + 1)
                self.model(self.x[start : start + self.chunk], training=True)
        finally:
            for bn, momentum in zip(bns, saved, strict=True):
                bn.momentum = momentum

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.recalibrate()
