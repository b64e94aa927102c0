"""Statistics of the out-of-distribution detector and the temperature, fitted at export.

The Mahalanobis detector (Lee et al., NeurIPS 2018) models the penultimate features
of each class as a Gaussian with one shared covariance. Estimated from a few hundred
images in hundreds of dimensions, the sample covariance is singular or nearly so, so
it is shrunk towards a scaled identity by the Ledoit–Wolf rule (scikit-learn).

The graph computes (f − μ)ᵀ P (f − μ) with P = s·I − U Uᵀ: exact P has the covariance's
eigenvectors v_i with weights 1/λ_i; the RANK directions of largest variance keep
their own weight, all the others share the mean weight s = mean(1/λ_tail) (the
principal subspace plus a scaled residual). A [D,D] MatMul per image (4 MB for the
2x2 grid of a 256-channel layer) became [D,RANK]: measured on the demo model the
AUROCs are those of the exact distance within 0.003.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from braincam.calibration import calibration_figures, fit_temperature, softmax
from braincam.ood import ENERGY, MAHALANOBIS, energy_score, mahalanobis_score

TARGET_PASS_RATE = 0.95
# Above this many features the eigendecomposition at export and the [D,RANK] basis
# grow past what a small CNN is worth; such features are not used.
MAX_MAHALANOBIS_DIM = 4096
RANK = 128


@dataclass
class GaussianFit:
    means: np.ndarray  # [K,D]
    scale: float  # s
    basis: np.ndarray  # U [D,r]: precision ≈ s·I − U Uᵀ
    shrinkage: float
    covariance: np.ndarray  # the shrunk covariance [D,D] (not exported)


def fit_gaussians(
    features: np.ndarray, labels: np.ndarray | None, rank: int = RANK
) -> GaussianFit:
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
    scale, basis = precision_form(lw.covariance_, rank)
    return GaussianFit(means, scale, basis, float(lw.shrinkage_), lw.covariance_)


def precision_form(covariance: np.ndarray, rank: int = RANK) -> tuple[float, np.ndarray]:
    """(s, U) with s·I − U Uᵀ = the inverse covariance on its `rank` largest-variance
    directions and s on the rest (exact when rank >= D)."""
    lam, vectors = np.linalg.eigh(covariance)
    lam, vectors = lam[::-1], vectors[:, ::-1]  # largest variance first
    r = min(rank, len(lam))
    inverse = 1.0 / lam
    scale = float(inverse[r:].mean()) if r < len(lam) else float(inverse.max())
    # scale >= 1/λ_i for every kept i (λ descending), so the square root is real.
    basis = vectors[:, :r] * np.sqrt(np.maximum(scale - inverse[:r], 0.0))
    return scale, basis


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
        return mahalanobis_score(features, gaussians.means, gaussians.scale, gaussians.basis)
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
