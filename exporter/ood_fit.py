"""Statistics of the out-of-distribution detector and the temperature, fitted at export.

The Mahalanobis detector (Lee et al., NeurIPS 2018) models the penultimate features
of each class as a Gaussian with one shared covariance. Estimated from a few hundred
images in hundreds of dimensions, the sample covariance is singular or nearly so, so
it is shrunk towards a scaled identity by the Ledoit–Wolf rule (scikit-learn); its
inverse is factored P = L Lᵀ (Cholesky) so the graph computes ||(f − μ_k) L||².
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from braincam.calibration import calibration_figures, fit_temperature, softmax
from braincam.ood import ENERGY, MAHALANOBIS, energy_score, mahalanobis_score

TARGET_PASS_RATE = 0.95
# Above this many features the [D,D] precision's MatMul costs a noticeable share of a
# small CNN's run (2048: 16 MB, ~1 ms on a CPU core); such features are not used.
MAX_MAHALANOBIS_DIM = 2048


@dataclass
class GaussianFit:
    means: np.ndarray  # [K,D]
    factor: np.ndarray  # L [D,D], precision = L Lᵀ
    shrinkage: float


def fit_gaussians(features: np.ndarray, labels: np.ndarray | None) -> GaussianFit:
    """Class means and the Ledoit–Wolf-shrunk covariance of the class-centred features.

    Without labels, one Gaussian for all images.
    """
    from sklearn.covariance import LedoitWolf

    f = np.asarray(features, dtype=np.float64)
    groups = np.zeros(len(f), np.int64) if labels is None else np.asarray(labels, np.int64)
    classes = np.unique(groups)
    means = np.stack([f[groups == c].mean(axis=0) for c in classes])
    centred = f - means[np.searchsorted(classes, groups)]
    lw = LedoitWolf(assume_centered=True).fit(centred)
    factor = np.linalg.cholesky(np.linalg.inv(lw.covariance_))
    return GaussianFit(means, factor, float(lw.shrinkage_))


def pass_threshold(scores: np.ndarray, pass_rate: float = TARGET_PASS_RATE) -> float:
    """The held-out score at rank ⌈(n + 1)·pass_rate⌉ (the largest when n is small).

    The conformal rank, not the plain quantile: a new in-distribution image is
    exchangeable with the n held-out ones, so it passes with probability at least
    `pass_rate` (Vovk et al. 2005). The plain 95 % quantile of 24 images lets 8 %
    of new ones fail on average.
    """
    ordered = np.sort(np.asarray(scores, np.float64))
    rank = min(int(np.ceil((len(ordered) + 1) * pass_rate)), len(ordered))
    return float(ordered[rank - 1])


@dataclass
class FitImages:
    """Preprocessed in-distribution images: one set to fit on, one held out."""

    fit_x: np.ndarray
    fit_y: np.ndarray | None
    held_x: np.ndarray
    held_y: np.ndarray | None
    source: str


@dataclass
class TrustFit:
    """Everything the graph edits and model.json need."""

    detector: str
    threshold: float
    held_out_pass_rate: float
    fit_size: int
    held_out_size: int
    source: str
    feature_dim: int
    features: str = ""  # the graph tensor the detector reads
    gaussians: GaussianFit | None = None
    temperature: float = 1.0
    temperature_at_bound: bool = False
    calibration_size: int = 0
    calibration_figures: dict[str, float] = field(default_factory=dict)
    held_out_scores: dict[str, np.ndarray] = field(default_factory=dict)


def score(detector: str, features: np.ndarray, logits: np.ndarray,
          gaussians: GaussianFit | None) -> np.ndarray:
    if detector == MAHALANOBIS:
        if gaussians is None:
            raise ValueError("the Mahalanobis score needs fitted Gaussians")
        return mahalanobis_score(features, gaussians.means, gaussians.factor)
    return energy_score(logits)


def fit_trust(
    fit_features: np.ndarray,
    fit_labels: np.ndarray | None,
    held_features: np.ndarray,
    held_logits: np.ndarray,
    held_labels: np.ndarray | None,
    source: str,
    detector: str = MAHALANOBIS,
    calibrate: bool = True,
    temperature: float | None = None,
) -> TrustFit:
    """Fit the detector on one set, set its threshold and the temperature on the other."""
    dim = int(fit_features.shape[1])
    gaussians = fit_gaussians(fit_features, fit_labels) if detector == MAHALANOBIS else None
    held_scores = {ENERGY: energy_score(held_logits)}
    if gaussians is not None:
        held_scores[MAHALANOBIS] = score(MAHALANOBIS, held_features, held_logits, gaussians)
    threshold = pass_threshold(held_scores[detector])
    fit = TrustFit(
        detector=detector,
        threshold=threshold,
        held_out_pass_rate=float(np.mean(held_scores[detector] <= threshold)),
        fit_size=len(fit_features),
        held_out_size=len(held_features),
        source=source,
        feature_dim=dim,
        gaussians=gaussians,
        held_out_scores=held_scores,
    )
    if calibrate and held_labels is not None:
        t, at_bound = (temperature, False) if temperature else fit_temperature(
            held_logits, held_labels
        )
        fit.temperature, fit.temperature_at_bound = t, at_bound
        fit.calibration_size = len(held_labels)
        fit.calibration_figures = calibration_figures(held_logits, held_labels, t)
    return fit


def calibrated_probabilities(logits: np.ndarray, fit: TrustFit) -> np.ndarray:
    return softmax(logits, fit.temperature)
