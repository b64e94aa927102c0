"""Out-of-distribution scores: the NumPy reference of what the exported graphs compute,
and the verdict every consumer (service, CLI) derives from a graph's `ood_score`.

Higher scores are more unusual. The exporter fits the detector on the model's own
penultimate features and stores the threshold in model.json (`ood`); the graphs
output the score, so no consumer computes statistics of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from braincam.model_spec import ModelSpec

MAHALANOBIS = "mahalanobis"
ENERGY = "energy"
DETECTORS = (MAHALANOBIS, ENERGY)


def mahalanobis_score(
    features: np.ndarray, means: np.ndarray, scale: float, basis: np.ndarray
) -> np.ndarray:
    """min over classes k of (f − μ_k)ᵀ P (f − μ_k), the precision written P = s·I − U Uᵀ.

    `features` [N,D], `means` [K,D], `scale` s, `basis` U [D,r] -> [N]. The form holds
    the exact precision (r = D) and its low-rank-plus-residual approximation alike
    (exporter/ood_fit.py), and costs D·r multiply-adds instead of D².
    """
    d = np.asarray(features, np.float64)[:, None, :] - np.asarray(means, np.float64)[None]
    projected = d @ np.asarray(basis, np.float64)
    return np.asarray(np.min(scale * np.sum(d * d, axis=2) - np.sum(projected**2, axis=2),
                             axis=1))


def energy_score(logits: np.ndarray) -> np.ndarray:
    """−logsumexp(logits) (Liu et al., NeurIPS 2020), as a score where higher = more unusual."""
    z = np.asarray(logits, dtype=np.float64)
    m = z.max(axis=1)
    return np.asarray(-(m + np.log(np.exp(z - m[:, None]).sum(axis=1))))


# The three fields every consumer reports, in this order.
OOD_FIELDS = ("ood_score", "ood_threshold", "in_distribution")


@dataclass(frozen=True)
class OodVerdict:
    """What /predict, /explain and the batch CLI report about one input."""

    ood_score: float
    ood_threshold: float
    in_distribution: bool

    def warning(self) -> str | None:
        """The `out_of_distribution` warning's text for one flagged image, or None."""
        if self.in_distribution:
            return None
        return (
            f"the image is unlike the images the model was trained on (out-of-distribution "
            f"score {self.ood_score:.4g} > threshold {self.ood_threshold:.4g}); its answer "
            "should not be trusted"
        )

    def as_dict(self) -> dict[str, float | bool]:
        return {
            "ood_score": self.ood_score,
            "ood_threshold": self.ood_threshold,
            "in_distribution": self.in_distribution,
        }


def ood_verdict(score: float | np.ndarray | None, spec: ModelSpec) -> OodVerdict | None:
    """The gate's verdict on one image's `ood_score`; None for models without a detector."""
    if spec.ood is None or score is None:
        return None
    value = float(np.asarray(score).reshape(-1)[0])
    # A NaN score (it cannot come from a finite image, but a broken graph could give
    # one) fails the gate rather than passing it.
    passed = bool(np.isfinite(value) and value <= spec.ood.threshold)
    return OodVerdict(round(value, 6), spec.ood.threshold, passed)
