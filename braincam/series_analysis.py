"""A series through the model: every slice in batches through the one ORT session, a
per-slice decision, and one series-level decision by a documented rule.

The series rule (SERIES_RULE): each slice is decided as /predict decides one image
(`decide`, so a binary model's threshold applies). If any slice is decided as a
tumour class, the series gets the tumour class of highest probability among those
slices, and the slice carrying it is the deciding slice. Only when no slice passes
the decision for any tumour class is the series negative; its deciding slice is
then the one with the least negative probability (the closest call), and the
series confidence is that slice's negative probability. A model without a negative
class (no binary negative label, no label like `notumor`) has every slice "positive":
its most confident slice decides.

The out-of-distribution gate (models with a detector): the rule decides on the
slices the gate passes; flagged slices are left out of it, counted, and reported
beside their own answers. Only when the gate flags every slice does the rule run
over all of them, and then the series is out of distribution (`SeriesGate`): its
decision rests on flagged slices, the one case `BRAINCAM_OOD_POLICY=reject` refuses
(before any overlay is computed). So a series is refused exactly when its decision
would rest on a flagged slice, and "all slices flagged" is that same condition.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from braincam.cam import compute_cam, resize_cam
from braincam.decision import Decision, decide
from braincam.errors import OutOfDistribution
from braincam.head import HeadCheck, check_head
from braincam.inference import Classified, OnnxModel
from braincam.model_spec import ModelSpec
from braincam.occlusion import OCCLUSION, OcclusionSensitivity
from braincam.ood import OodVerdict, ood_verdict
from braincam.overlay import OOD_BANNER, blend, colorize
from braincam.preprocessing import preprocess_batch
from braincam.series import Series

SERIES_RULE = (
    "the most probable tumour class over the slices decided as tumour, with the slice "
    "carrying it; negative only when no slice is decided as a tumour class (then the "
    "slice with the lowest negative probability); slices the out-of-distribution gate "
    "flags are left out unless it flags every slice"
)
NEGATIVE_LABELS = ("notumor", "no_tumor", "no-tumor", "normal", "healthy", "negative")
DEFAULT_BATCH_SIZE = 16


def negative_index(spec: ModelSpec) -> int | None:
    """The class meaning "no finding": a binary model's non-positive label, or a
    multiclass label named like `notumor`; None when the model has none."""
    if spec.task == "binary" and spec.decision.positive_label:
        return 1 - spec.label_index(spec.decision.positive_label)
    for i, label in enumerate(spec.labels):
        if label.lower() in NEGATIVE_LABELS:
            return i
    return None


@dataclass(frozen=True)
class SeriesGate:
    """The out-of-distribution gate over a whole series (models with a detector)."""

    in_distribution: bool  # false: every slice is flagged, the decision rests on them
    flagged: int  # slices the gate flagged
    n_slices: int
    deciding: OodVerdict  # the deciding slice's verdict
    # Flagged slices left out of a negative decision although they were decided as a
    # tumour class: the reader should know what the rule did not weigh.
    flagged_positive: int = 0

    def warning(self) -> str | None:
        """What a reader of the answer must know, or None when no slice is flagged."""
        if not self.flagged:
            return None
        if not self.in_distribution:
            return (
                f"{OOD_BANNER}: all {self.n_slices} slices are unlike the images the model "
                f"was trained on (out-of-distribution score above the threshold "
                f"{self.deciding.ood_threshold:.4g}); the series decision rests on them and "
                "should not be trusted"
            )
        text = (
            f"{self.flagged} of {self.n_slices} slices are unlike the images the model was "
            "trained on and were left out of the series decision"
        )
        if self.flagged_positive:
            text += f" ({self.flagged_positive} of them were classified as a tumour class)"
        return text

    def refusal(self) -> OutOfDistribution:
        """The 422 of BRAINCAM_OOD_POLICY=reject for this series."""
        return OutOfDistribution(
            f"all {self.flagged} of {self.n_slices} slices of the series are unlike the "
            "images the model was trained on (out-of-distribution score above the "
            f"threshold {self.deciding.ood_threshold:.4g}); it was not classified "
            "(BRAINCAM_OOD_POLICY=reject)"
        )


@dataclass
class SeriesResult:
    decisions: list[Decision]  # per slice, in series order
    decision: Decision  # the series' decision
    deciding_slice: int
    inference_s: float
    preprocess_s: float
    batches: int
    overlays: dict[int, np.ndarray] = field(default_factory=dict)  # slice -> RGB uint8
    explain_s: float = 0.0
    # Per slice, the out-of-distribution gate's verdict (None: the model has no detector).
    ood: list[OodVerdict | None] = field(default_factory=list)
    gate: SeriesGate | None = None  # the series' verdict (None: no detector)
    # Per explained slice, where its map lies against the head (braincam.head).
    heads: dict[int, HeadCheck] = field(default_factory=dict)


def series_decision(
    decisions: Sequence[Decision],
    spec: ModelSpec,
    passed: Sequence[bool] | None = None,
) -> tuple[Decision, int]:
    """The series' decision and its deciding slice (see SERIES_RULE).

    `passed`: per slice, whether the out-of-distribution gate passed it; the rule
    then decides on those slices only, unless none passed.
    """
    indices = list(range(len(decisions)))
    if passed is not None and any(passed):
        indices = [i for i in indices if passed[i]]
    negative = negative_index(spec)
    positives = [i for i in indices if decisions[i].class_index != negative]
    if positives:
        best = max(positives, key=lambda i: decisions[i].confidence)
        return decisions[best], best
    assert negative is not None  # every slice decided the negative class
    label = spec.labels[negative]
    best = min(indices, key=lambda i: decisions[i].probabilities[label])
    return decisions[best], best


def series_gate(
    decisions: Sequence[Decision],
    verdicts: Sequence[OodVerdict | None],
    deciding: int,
    spec: ModelSpec,
) -> SeriesGate | None:
    """The series-level verdict; None for a model without a detector."""
    deciding_verdict = verdicts[deciding] if verdicts else None
    if deciding_verdict is None:
        return None
    flagged = [i for i, v in enumerate(verdicts) if v is not None and not v.in_distribution]
    negative = negative_index(spec)
    left_out_positive = 0
    if decisions[deciding].class_index == negative and deciding_verdict.in_distribution:
        left_out_positive = sum(decisions[i].class_index != negative for i in flagged)
    return SeriesGate(
        in_distribution=deciding_verdict.in_distribution,
        flagged=len(flagged),
        n_slices=len(decisions),
        deciding=deciding_verdict,
        flagged_positive=left_out_positive,
    )


def analyse(
    model: OnnxModel,
    series: Series,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    explain: Sequence[int] = (),
    method: str = "gradcam",
    colormap: str = "jet",
    alpha: float = 0.4,
    explain_deciding: bool = False,
    classify: Callable[[np.ndarray], Classified] | None = None,
    ood_policy: Literal["warn", "reject"] = "warn",
) -> SeriesResult:
    """Predict every slice; with `explain_deciding` (and for the slices in `explain`)
    also the overlay of the slice's decided class, from one batched Grad-CAM run.

    `classify` runs the classifier on a batch (default `model.classify`; the service
    passes its micro-batcher's, so a series shares runs with concurrent requests).
    The series rule decides on the slices the out-of-distribution gate passes (see
    the module's docstring); with `ood_policy="reject"` a series whose every slice is
    flagged raises `OutOfDistribution` before any overlay is computed."""
    spec = model.spec
    probs = []
    scores: list[np.ndarray] = []
    preprocess_s = inference_s = 0.0
    batches = 0
    for start in range(0, len(series.slices), batch_size):
        chunk = series.slices[start : start + batch_size]
        t0 = time.perf_counter()
        x = preprocess_batch([s.pixels for s in chunk], spec.preprocessing)
        t1 = time.perf_counter()
        out = (classify or model.classify)(x)
        probs.append(out.probabilities)
        if out.ood_score is not None:
            scores.append(out.ood_score)
        inference_s += time.perf_counter() - t1
        preprocess_s += t1 - t0
        batches += 1
    all_probs = np.concatenate(probs)
    decisions = [decide(p, spec) for p in all_probs]
    all_scores = np.concatenate(scores) if scores else [None] * len(decisions)
    verdicts = [ood_verdict(s, spec) for s in all_scores]
    passed = None if verdicts[0] is None else [bool(v and v.in_distribution) for v in verdicts]
    decision, deciding = series_decision(decisions, spec, passed)
    result = SeriesResult(decisions, decision, deciding, inference_s, preprocess_s, batches)
    result.ood = verdicts
    result.gate = series_gate(decisions, verdicts, deciding, spec)
    if ood_policy == "reject" and result.gate is not None and not result.gate.in_distribution:
        raise result.gate.refusal()
    wanted = sorted({*explain, *([deciding] if explain_deciding else [])})
    if wanted:
        t0 = time.perf_counter()
        result.overlays, result.heads = _overlays(
            model, series, decisions, wanted, method, colormap, alpha
        )
        result.explain_s = time.perf_counter() - t0
    return result


def _overlays(
    model: OnnxModel,
    series: Series,
    decisions: Sequence[Decision],
    indices: Sequence[int],
    method: str,
    colormap: str,
    alpha: float,
) -> tuple[dict[int, np.ndarray], dict[int, HeadCheck]]:
    spec = model.spec
    negative = negative_index(spec)
    out: dict[int, np.ndarray] = {}
    heads: dict[int, HeadCheck] = {}
    for start in range(0, len(indices), DEFAULT_BATCH_SIZE):
        chunk = list(indices[start : start + DEFAULT_BATCH_SIZE])
        x = preprocess_batch([series.slices[i].pixels for i in chunk], spec.preprocessing)
        # Explicit targets: each map explains the class its slice was decided as.
        targets = np.array([decisions[i].class_index for i in chunk], dtype=np.int64)
        pixels = [series.slices[i].pixels for i in chunk]
        sizes = [(int(p.shape[1]), int(p.shape[0])) for p in pixels]
        cams = _maps(model, x, targets, method, sizes)
        for i, image, cam, target in zip(chunk, pixels, cams, targets, strict=True):
            out[i] = blend(image, colorize(cam, colormap), alpha)
            heads[i] = check_head(image, cam, meaningful=int(target) != negative)
    return out, heads


def _maps(
    model: OnnxModel,
    x: np.ndarray,
    targets: np.ndarray,
    method: str,
    sizes: Sequence[tuple[int, int]],
) -> list[np.ndarray]:
    """One map per image at its own size: from one Grad-CAM run, or by occlusion from
    the classifier alone (seconds per slice)."""
    if method == OCCLUSION:
        occlusion = OcclusionSensitivity()
        maps = occlusion.maps(occlusion.drops(model.predict, x, targets))
        return [resize_cam(m, size) for m, size in zip(maps, sizes, strict=True)]
    run = model.gradcam(x, targets)
    return [
        compute_cam(method, run.activations[k : k + 1], run.gradients[k : k + 1], size)[0]
        for k, size in enumerate(sizes)
    ]
