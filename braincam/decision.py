"""Probabilities -> a labelled decision; binary models apply their tuned threshold."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from braincam.model_spec import ModelSpec


@dataclass(frozen=True)
class Decision:
    class_index: int
    label: str
    confidence: float
    probabilities: dict[str, float]


def decide(probs: np.ndarray, spec: ModelSpec) -> Decision:
    """One row of probabilities -> the model's decision."""
    p = np.asarray(probs, dtype=np.float64)
    index = int(np.argmax(p))
    if spec.task == "binary" and spec.decision.threshold is not None:
        positive = spec.label_index(spec.decision.positive_label or spec.labels[1])
        index = positive if p[positive] >= spec.decision.threshold else 1 - positive
    return Decision(
        class_index=index,
        label=spec.labels[index],
        confidence=float(p[index]),
        probabilities={label: float(v) for label, v in zip(spec.labels, p, strict=True)},
    )
