"""Confidence calibration: temperature scaling, expected calibration error, Brier score.

NumPy only, so the trainer, the exporter and the evaluation tools share one
definition. Temperature scaling (Guo et al., ICML 2017) divides the logits by one
scalar T fitted on labelled held-out images; it never changes which class has the
highest score, only how confident the probabilities are.
"""

from __future__ import annotations

import math

import numpy as np

ECE_BINS = 15
# Bounds of the fitted temperature. On a validation set the model classifies
# perfectly, the likelihood keeps rising as T -> 0 (sharper is always better there):
# the data cannot say how sharp to be. The fit then keeps the model's own scale (T = 1)
# and reports the bound: sharpening to the bound would push every answer, foreign
# images included, towards confidence 1.0.
T_MIN, T_MAX = 0.1, 10.0


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true class under softmax(logits / T)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    m = z.max(axis=1, keepdims=True)
    log_norm = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(z)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> tuple[float, bool]:
    """T minimising the NLL, by golden-section search on log T; -> (T, bound reached).

    The NLL is convex in 1/T, hence unimodal in log T: the search finds the optimum.
    An optimum at the lower bound (a perfectly separated fit set) gives T = 1.
    """
    labels = np.asarray(labels, dtype=np.int64)
    lo, hi = math.log(T_MIN), math.log(T_MAX)
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(logits, labels, math.exp(a)), nll(logits, labels, math.exp(b))
    for _ in range(80):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(logits, labels, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(logits, labels, math.exp(b))
    t = math.exp((lo + hi) / 2.0)
    if t < T_MIN * 1.01:
        return 1.0, True
    return float(t), t > T_MAX / 1.01


def expected_calibration_error(
    probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
    """Σ_bins |B|/n · |accuracy(B) − mean confidence(B)|, equal-width confidence bins."""
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    # Bin i holds confidences in (i/bins, (i+1)/bins]; a confidence of exactly 0 cannot occur.
    idx = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            total += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(total)


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over images of Σ_k (p_k − 1[k = true class])²."""
    probs = np.asarray(probs, dtype=np.float64)
    onehot = np.eye(probs.shape[1])[np.asarray(labels)]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def reliability_bins(
    probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> list[dict[str, float]]:
    """Per non-empty bin: its range, count, mean confidence and accuracy (the diagram)."""
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    idx = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        mask = idx == b
        if mask.any():
            out.append({"low": b / bins, "high": (b + 1) / bins, "count": int(mask.sum()),
                        "confidence": float(conf[mask].mean()),
                        "accuracy": float(correct[mask].mean())})
    return out


def calibration_figures(
    logits: np.ndarray, labels: np.ndarray, temperature: float
) -> dict[str, float]:
    """ECE and Brier score before (T = 1) and after temperature scaling."""
    before, after = softmax(logits), softmax(logits, temperature)
    return {
        "ece_before": expected_calibration_error(before, labels),
        "ece_after": expected_calibration_error(after, labels),
        "brier_before": brier_score(before, labels),
        "brier_after": brier_score(after, labels),
        "nll_before": nll(logits, labels),
        "nll_after": nll(logits, labels, temperature),
    }


def calibrated_threshold(threshold: float, temperature: float) -> float:
    """A threshold on a 2-way softmax's p(positive), moved to the calibrated scale.

    p = σ(Δ) with Δ the logit difference; calibrated p' = σ(Δ/T). The same Δ cut
    decides the same images, so p ≥ t ⇔ p' ≥ σ(logit(t)/T).
    """
    t = min(max(threshold, 1e-12), 1.0 - 1e-12)
    delta = math.log(t / (1.0 - t))
    return float(1.0 / (1.0 + math.exp(-delta / temperature)))
