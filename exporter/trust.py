"""Detector + temperature, end to end on ONNX protos: what any exporter calls.

    fit = fit_on_graph(classifier_proto, images, features=["grid_features", "features"],
                       logits="logits")
    apply_to_graphs(protos.values(), fit, logits="logits")
    ood, calibration = spec_sections(fit, logits="logits")

The features and logits are read by running the unedited classifier graph in ONNX
Runtime, so the statistics come from exactly the numbers the served graph computes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx

from braincam.model_spec import OOD_SCORE_OUTPUT, PROBABILITIES_OUTPUT, Calibration, OodDetector
from braincam.ood import ENERGY, MAHALANOBIS
from exporter import ood_graph
from exporter.ood_fit import (
    MAX_MAHALANOBIS_DIM,
    TARGET_PASS_RATE,
    FitImages,
    TrustFit,
    fit_trust,
)


def fit_on_graph(
    classifier: onnx.ModelProto,
    images: FitImages,
    *,
    features: Sequence[str],
    logits: str,
    detector: str = MAHALANOBIS,
    calibrate: bool = True,
    temperature: float | None = None,
    batch_size: int = 64,
) -> TrustFit:
    """`features`: candidate feature tensors, preferred first; the first narrow enough
    for a Mahalanobis detector is used. `temperature`: use this one (a trainer run's)
    instead of fitting it. `batch_size`: images per ONNX Runtime run (exporter/budget.py)."""
    names = [*features, logits]
    fit_values = ood_graph.tensor_values(classifier, images.fit_x, names, batch_size)
    held_values = ood_graph.tensor_values(classifier, images.held_x, names, batch_size)
    widths = [int(np.prod(v.shape[1:])) for v in fit_values[:-1]]
    usable = [i for i, d in enumerate(widths) if d <= MAX_MAHALANOBIS_DIM]
    chosen = usable[0] if usable else 0
    if not usable:
        detector = ENERGY
    fit_f, held_f, held_z = fit_values[chosen], held_values[chosen], held_values[-1]
    fit = fit_trust(
        fit_f.reshape(len(fit_f), -1),
        images.fit_y,
        held_f.reshape(len(held_f), -1),
        held_z,
        images.held_y,
        images.source,
        detector,
        calibrate,
        temperature,
    )
    fit.features = features[chosen] if fit.gaussians is not None else ""
    return fit


def apply_to_graphs(
    protos: Iterable[onnx.ModelProto],
    fit: TrustFit,
    *,
    logits: str,
    probabilities: str = PROBABILITIES_OUTPUT,
    remove: Iterable[str] = (),
) -> None:
    """Temperature and `ood_score` into every graph; `remove` drops helper outputs.

    The Div by T is written even when T = 1: every graph then computes its
    probabilities the same way, from a `logits` tensor that stays addressable.
    """
    drop = list(remove)
    for proto in protos:
        ood_graph.apply_temperature(proto, logits, probabilities, fit.temperature)
        if fit.gaussians is not None:
            ood_graph.append_mahalanobis(
                proto, fit.features, fit.gaussians.means, fit.gaussians.scale, fit.gaussians.basis
            )
        else:
            ood_graph.append_energy(proto, logits)
        ood_graph.remove_outputs(proto, drop)


def spec_sections(fit: TrustFit, *, logits: str) -> tuple[OodDetector, Calibration | None]:
    ood = OodDetector(
        detector=fit.detector,  # type: ignore[arg-type]
        threshold=float(np.float32(fit.threshold)),
        target_pass_rate=TARGET_PASS_RATE,
        held_out_pass_rate=round(fit.held_out_pass_rate, 4),
        fit_size=fit.fit_size,
        held_out_size=fit.held_out_size,
        fit_data=fit.source,
        output=OOD_SCORE_OUTPUT,
        features=fit.features,
        feature_dim=fit.feature_dim,
        logits=logits,
        gaussians=None if fit.gaussians is None else int(fit.gaussians.means.shape[0]),
        shrinkage=None if fit.gaussians is None else round(fit.gaussians.shrinkage, 6),
        rank=None if fit.gaussians is None else int(fit.gaussians.basis.shape[1]),
    )
    calibration = None
    if fit.calibration_size:
        calibration = Calibration(
            temperature=fit.temperature,
            fit_size=fit.calibration_size,
            fit_data=fit.source,
            at_bound=fit.temperature_at_bound,
            figures={k: round(v, 6) for k, v in fit.calibration_figures.items()},
        )
    return ood, calibration
