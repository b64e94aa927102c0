"""BRAINCAM_OOD_POLICY applied to a finished response: count, then warn or refuse."""

from __future__ import annotations

from braincam.errors import OutOfDistribution
from service.core.config import Settings
from service.metrics import Metrics
from service.schemas import PredictResponse


def count_flagged(settings: Settings, metrics: Metrics, endpoint: str) -> None:
    metrics.out_of_distribution.labels(endpoint=endpoint, policy=settings.ood_policy).inc()


def apply_policy(
    response: PredictResponse, settings: Settings, metrics: Metrics, endpoint: str
) -> None:
    """Flagged inputs are counted; with `reject` they become a 422 instead of an answer.

    With `warn` the response itself says so (`in_distribution: false`). Series are
    refused inside their analysis (braincam.series_analysis), before any overlay.
    """
    if response.in_distribution is not False:
        return
    count_flagged(settings, metrics, endpoint)
    if settings.ood_policy == "reject":
        raise OutOfDistribution(
            f"the image is unlike the images the model was trained on (out-of-distribution "
            f"score {response.ood_score:.4g} > threshold {response.ood_threshold:.4g}); "
            "it was not classified (BRAINCAM_OOD_POLICY=reject)"
        )
