"""The blocking work behind /predict and /explain (run in worker threads).

Both start from the upload's bytes and go through the same contract functions as
the trainer, the exporter and the batch CLI: `decode_image` -> `preprocess` -> ORT ->
`decide` (the framework-free steps are in braincam/pipeline.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from braincam.cam import compute_cam, flip_smoothed
from braincam.decision import Decision, decide
from braincam.decoding import DecodedImage
from braincam.errors import InvalidParameter
from braincam.inference import OnnxModel
from braincam.model_spec import ModelSpec
from braincam.overlay import blend, colorize, encode_png, panels, to_base64_png
from braincam.pipeline import Prepared, gradients_for, prepare
from service.metrics import Metrics
from service.schemas import (
    ExplainResponse,
    ExplainTiming,
    InputInfo,
    ModelRef,
    PredictResponse,
    PredictTiming,
    Target,
)


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


@dataclass(frozen=True)
class ExplainParams:
    target: int | None  # None: the decided class
    method: str
    colormap: str
    alpha: float
    smooth: bool
    png_compression: int
    images: frozenset[str] = frozenset({"overlay"})  # of IMAGES


# The PNGs /explain can return; `images` picks them (see the route).
IMAGES = ("overlay", "heatmap", "panels")


def resolve_images(value: str | None) -> frozenset[str]:
    """'overlay,heatmap' (any order, 'all' for every one) -> the set; empty -> overlay."""
    names = {part.strip().lower() for part in (value or "").split(",") if part.strip()}
    if "all" in names:
        return frozenset(IMAGES)
    unknown = sorted(names - set(IMAGES))
    if unknown:
        raise InvalidParameter(
            f"unknown image {unknown[0][:64]!r} in 'images'; "
            f"choose from {', '.join(IMAGES)} or all"
        )
    return frozenset(names or {"overlay"})


def resolve_target(value: str | None, spec: ModelSpec) -> int | None:
    """A label (case-insensitive) or a class index -> index; empty/None -> None."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text in spec.labels:
        return spec.labels.index(text)
    lowered = [label.lower() for label in spec.labels]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    if text.isascii() and text.isdigit() and int(text) < len(spec.labels):
        return int(text)
    raise InvalidParameter(
        f"'target' must be one of {', '.join(spec.labels)} "
        f"or an index 0..{len(spec.labels) - 1}, got {text[:64]!r}"
    )


def _input_info(decoded: DecodedImage) -> InputInfo:
    width, height = decoded.size
    return InputInfo(
        format=decoded.format,
        width=width,
        height=height,
        bit_depth=decoded.bit_depth,
        slice=decoded.slice_index,
        n_slices=decoded.n_slices,
    )


def _decision_fields(decision: Decision, spec: ModelSpec) -> dict[str, Any]:
    return {
        "label": decision.label,
        "class_index": decision.class_index,
        "confidence": decision.confidence,
        "probabilities": decision.probabilities,
        "model": ModelRef(name=spec.name, version=spec.version),
    }


def predict(
    model: OnnxModel,
    metrics: Metrics,
    data: bytes,
    slice_index: int | None,
    started: float,
) -> PredictResponse:
    """The unbatched /predict: everything in the calling worker thread."""
    spec = model.spec
    prepared = prepare(data, slice_index, spec)
    t0 = time.perf_counter()
    probs = model.predict(prepared.batch)[0]
    inference_s = time.perf_counter() - t0
    metrics.inference.labels(graph="classifier").observe(inference_s)
    return predict_response(spec, prepared, probs, inference_s, started)


def predict_response(
    spec: ModelSpec,
    prepared: Prepared,
    probabilities: np.ndarray,
    inference_s: float,
    started: float,
) -> PredictResponse:
    """The response for one image's probabilities [K] (cheap: fine on the event loop)."""
    decision = decide(probabilities, spec)
    return PredictResponse(
        **_decision_fields(decision, spec),
        input=_input_info(prepared.decoded),
        timing_ms=PredictTiming(
            decode=_ms(prepared.decode_s),
            preprocess=_ms(prepared.preprocess_s),
            inference=_ms(inference_s),
            total=_ms(time.perf_counter() - started),
        ),
    )


def explain(
    model: OnnxModel,
    metrics: Metrics,
    data: bytes,
    slice_index: int | None,
    params: ExplainParams,
    started: float,
) -> ExplainResponse:
    spec = model.spec
    prepared = prepare(data, slice_index, spec)
    decoded = prepared.decoded
    x = prepared.batch
    # smooth: the image and its left-right mirror (W is axis 2 of NHWC) as ONE batch.
    batch = np.ascontiguousarray(np.concatenate([x, x[:, :, ::-1, :]])) if params.smooth else x
    n = batch.shape[0]

    t0 = time.perf_counter()
    requested = -1 if params.target is None else params.target
    out = model.gradcam(batch, np.full((n,), requested, dtype=np.int64))
    # The prediction comes from the same run: no separate classifier pass.
    decision = decide(out.probabilities[0], spec)
    explained = decision.class_index if params.target is None else params.target
    acts, grads, runs = gradients_for(model, batch, out, np.full((n,), explained, np.int64))
    inference_s = time.perf_counter() - t0
    metrics.inference.labels(graph="gradcam").observe(inference_s)

    t1 = time.perf_counter()
    cams = compute_cam(params.method, acts, grads, size=decoded.size)
    cam = flip_smoothed(cams[0], cams[1]) if params.smooth else cams[0]
    t2 = time.perf_counter()
    heat = colorize(cam, params.colormap)
    images = params.images
    level = params.png_compression
    # The overlay is blended only when returned or drawn into the panels.
    overlay = blend(decoded.pixels, heat, params.alpha) if images & {"overlay", "panels"} else None
    overlay_png = heatmap_png = panels_png = None
    if overlay is not None and "overlay" in images:
        overlay_png = to_base64_png(overlay, level)
    if "heatmap" in images:
        heatmap_png = to_base64_png(heat, level)
    if overlay is not None and "panels" in images:
        panels_png = to_base64_png(panels(decoded.pixels, heat, overlay), level)
    t3 = time.perf_counter()

    return ExplainResponse(
        **_decision_fields(decision, spec),
        input=_input_info(decoded),
        target=Target(class_index=explained, label=spec.labels[explained]),
        method=params.method,
        layer=spec.explanation.layer,
        colormap=params.colormap,
        alpha=params.alpha,
        smooth=params.smooth,
        gradcam_runs=runs,
        overlay_png=overlay_png,
        heatmap_png=heatmap_png,
        panels_png=panels_png,
        timing_ms=ExplainTiming(
            decode=_ms(prepared.decode_s),
            preprocess=_ms(prepared.preprocess_s),
            inference=_ms(inference_s),
            cam=_ms(t2 - t1),
            encode=_ms(t3 - t2),
            total=_ms(time.perf_counter() - started),
        ),
    )


def warmup(model: OnnxModel) -> None:
    """Run /predict's and /explain's whole path once on a synthetic image.

    `OnnxModel.warmup` covers ONNX Runtime; this also pays OpenCV's one-off costs
    (codec and font initialisation: tens to hundreds of ms) before the first request.
    """
    h, w, _ = model.spec.input_shape
    ramp = np.linspace(0, 255, h * w, dtype=np.float32).reshape(h, w).astype(np.uint8)
    data = encode_png(ramp)
    scratch = Metrics()  # not the app's: warm-up runs are not traffic
    params = ExplainParams(
        None, "gradcam", "jet", 0.4, smooth=False, png_compression=1, images=frozenset(IMAGES)
    )
    predict(model, scratch, data, None, time.perf_counter())
    explain(model, scratch, data, None, params, time.perf_counter())


def warm_thread() -> None:
    """The per-thread part of the warm-up: OpenCV's text rendering (panel titles)."""
    tiny = np.zeros((16, 16), dtype=np.uint8)
    panels(tiny, tiny, tiny)
