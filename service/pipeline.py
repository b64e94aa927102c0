"""The blocking work behind /predict and /explain (run in worker threads).

Both start from the upload's bytes and go through the same contract functions as
the trainer, the exporter and the batch CLI: `decode_image` -> `preprocess` -> ORT ->
`decide` (the framework-free steps are in braincam/pipeline.py).
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from braincam.cam import (
    METHODS,
    available_methods,
    compute_cam,
    default_method,
    flip_smoothed,
    resize_cam,
)
from braincam.decision import Decision, decide
from braincam.decoding import DecodedImage
from braincam.dicom_results import ResultWarning, head_warnings
from braincam.errors import InvalidParameter, MethodUnavailable
from braincam.explainers import (
    attribution_methods,
    make_explainer,
    uses_attribution,
)
from braincam.head import HeadCheck, check_head
from braincam.inference import OnnxModel
from braincam.model_spec import IMAGE_INPUT, ModelSpec
from braincam.occlusion import OCCLUSION, OcclusionSensitivity
from braincam.ood import OodVerdict, ood_verdict
from braincam.overlay import (
    IMAGE_FORMATS,
    ImageFormat,
    blend,
    colorize,
    encode_image,
    encode_png,
    panels,
    to_base64,
)
from braincam.pipeline import Prepared, gradients_for, prepare
from braincam.series_analysis import negative_index
from service.metrics import Metrics
from service.schemas import (
    AnswerWarning,
    ExplainResponse,
    ExplainTiming,
    InputInfo,
    ModelRef,
    PredictResponse,
    PredictTiming,
    RawCam,
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
    png_compression: int | None  # None: fpng; 0..9: libpng at that zlib level
    images: frozenset[str] = frozenset({"overlay"})  # of IMAGES
    image_format: ImageFormat = "png"
    heatmap: str = "image"  # of HEATMAP_MODES
    layer: str | None = None  # None: the Grad-CAM graph's layer (or the method's own)
    samples: int | None = None  # SmoothGrad's noisy copies, IG's steps (None: default)


# The images /explain can return; `images` picks them (see the route).
IMAGES = ("overlay", "heatmap", "panels")
# heatmap=image: only the images; raw: also the map at the explained layer's (or the
# occlusion grid's) resolution as base64 float32; list: the same as a JSON list of rows.
HEATMAP_MODES = ("image", "raw", "list")


def resolve_heatmap(value: str | None) -> str:
    mode = (value or "image").strip().lower()
    if mode not in HEATMAP_MODES:
        raise InvalidParameter(
            f"'heatmap' must be one of {', '.join(HEATMAP_MODES)}, got {mode[:64]!r}"
        )
    return mode


def resolve_images(value: str | None, heatmap: str = "image") -> frozenset[str]:
    """'overlay,heatmap' (any order, 'all' for every one, 'none') -> the set.

    Unset: the overlay, or no image at all when the raw map was asked for (a client
    that renders the map itself should not pay for an encoded image).
    """
    if value is None:
        return frozenset({"overlay"}) if heatmap == "image" else frozenset()
    names = {part.strip().lower() for part in value.split(",") if part.strip()}
    if "all" in names:
        return frozenset(IMAGES)
    if names == {"none"}:
        return frozenset()
    unknown = sorted(names - set(IMAGES))
    if unknown:
        raise InvalidParameter(
            f"unknown image {unknown[0][:64]!r} in 'images'; "
            f"choose from {', '.join(IMAGES)}, all or none"
        )
    return frozenset(names or {"overlay"})


def raw_cam(cam: np.ndarray, mode: str) -> RawCam:
    """The map [h,w] in [0,1] at the explained layer's resolution, as /explain returns it."""
    values = np.ascontiguousarray(cam, dtype="<f4")
    h, w = values.shape
    if mode == "list":
        return RawCam(shape=[h, w], encoding="list", data=values.tolist())
    return RawCam(
        shape=[h, w], encoding="base64", data=base64.b64encode(values.tobytes()).decode("ascii")
    )


def resolve_method(value: str | None, model: OnnxModel, occlusion: bool) -> str:
    """A method name -> the name, if this model offers it (see `available_methods`);
    none -> the model's default (gradcam, or occlusion without a Grad-CAM graph)."""
    if value is None or not value.strip():
        return default_method(model.has_gradcam)
    name = value.strip().lower()[:64]  # [:64]: a bounded echo in errors
    offered = available_methods(model.has_gradcam, occlusion)
    offered += [m for m in attribution_methods(model) if m not in offered]
    if name in offered:
        return name
    if name in ("smoothgrad", "integrated_gradients"):
        raise MethodUnavailable(
            f"method {name!r} needs attribution.onnx, which this model directory does not "
            f"have; available: {', '.join(offered)}"
        )
    if name in METHODS:
        raise MethodUnavailable(
            f"method {name!r} needs a Grad-CAM graph (gradcam.onnx), which this model does "
            f"not have; available: {', '.join(offered)}"
        )
    if name == OCCLUSION:
        raise MethodUnavailable(
            "method 'occlusion' is off for models with a Grad-CAM graph (it costs one "
            "classifier run per 32 occluding windows); the server offers it with "
            f"BRAINCAM_OCCLUSION=true; available: {', '.join(offered)}"
        )
    raise InvalidParameter(f"unknown CAM method {name!r}; valid methods: {', '.join(offered)}")


def resolve_layer(value: str | None, method: str, samples: int | None,
                  model: OnnxModel) -> str | None:
    """`layer` (and `samples`) checked against the model directory before any upload is
    read: a layer or method it does not have is a 422 naming what it has."""
    layer = value.strip()[:200] if value and value.strip() else None
    if method == OCCLUSION and (layer is not None or samples is not None):
        raise InvalidParameter("'layer' and 'samples' do not apply to method 'occlusion'")
    if uses_attribution(method, layer, model):
        make_explainer(method, layer, samples, model)
    elif samples is not None:
        raise InvalidParameter("'samples' applies to smoothgrad and integrated_gradients only")
    return layer


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


def _decision_fields(
    decision: Decision, spec: ModelSpec, ood_score: np.ndarray | float | None = None
) -> dict[str, Any]:
    verdict = ood_verdict(ood_score, spec)
    return {
        "label": decision.label,
        "class_index": decision.class_index,
        "confidence": decision.confidence,
        "probabilities": decision.probabilities,
        "model": ModelRef(name=spec.name, version=spec.version, notice=spec.notice),
        **(verdict.as_dict() if verdict is not None else {}),
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
    out = model.classify(prepared.batch)
    inference_s = time.perf_counter() - t0
    metrics.inference.labels(graph="classifier").observe(inference_s)
    score = None if out.ood_score is None else out.ood_score[0]
    return predict_response(spec, prepared, out.probabilities[0], inference_s, started, score)


def predict_response(
    spec: ModelSpec,
    prepared: Prepared,
    probabilities: np.ndarray,
    inference_s: float,
    started: float,
    ood_score: np.ndarray | float | None = None,
) -> PredictResponse:
    """The response for one image's probabilities [K] (cheap: fine on the event loop)."""
    decision = decide(probabilities, spec)
    return PredictResponse(
        **_decision_fields(decision, spec, ood_score),
        input=_input_info(prepared.decoded),
        timing_ms=PredictTiming(
            decode=_ms(prepared.decode_s),
            preprocess=_ms(prepared.preprocess_s),
            inference=_ms(inference_s),
            total=_ms(time.perf_counter() - started),
        ),
    )


@dataclass
class _Maps:
    """The explanation's model-side part, whichever method made it."""

    decision: Decision
    explained: int  # the class the maps explain
    cams: np.ndarray  # [n, H, W] in [0, 1], at the upload's size
    layer: str  # the explained layer, or the input for occlusion
    gradcam_runs: int
    inference_s: float
    cam_s: float
    ood_score: float | None = None  # of the uploaded image (row 0), not of its mirror
    small: np.ndarray | None = None  # the maps at the layer's (grid's) size, for heatmap=raw


def _gradcam_maps(
    model: OnnxModel, batch: np.ndarray, params: ExplainParams, size: tuple[int, int]
) -> _Maps:
    spec = model.spec
    n = batch.shape[0]
    t0 = time.perf_counter()
    requested = -1 if params.target is None else params.target
    out = model.gradcam(batch, np.full((n,), requested, dtype=np.int64))
    # The prediction comes from the same run: no separate classifier pass.
    decision = decide(out.probabilities[0], spec)
    explained = decision.class_index if params.target is None else params.target
    acts, grads, runs = gradients_for(model, batch, out, np.full((n,), explained, np.int64))
    t1 = time.perf_counter()
    cams = compute_cam(params.method, acts, grads, size=size)
    small = compute_cam(params.method, acts, grads) if params.heatmap != "image" else None
    score = None if out.ood_score is None else float(out.ood_score[0])
    return _Maps(
        decision, explained, cams, spec.explanation.layer, runs, t1 - t0,
        time.perf_counter() - t1, score, small,
    )


def _attribution_maps(
    model: OnnxModel, batch: np.ndarray, params: ExplainParams, size: tuple[int, int]
) -> _Maps:
    """From attribution.onnx (braincam/explainers.py): the decision from one classifier
    run on the upload, then one attribution run explaining that class (a batch of the
    noisy or interpolated copies for SmoothGrad and Integrated Gradients)."""
    explainer = make_explainer(params.method, params.layer, params.samples, model)
    t0 = time.perf_counter()
    first = model.classify(batch)
    decision = decide(first.probabilities[0], model.spec)
    explained = decision.class_index if params.target is None else params.target
    small = explainer(model, batch, np.full((batch.shape[0],), explained, np.int64))
    t1 = time.perf_counter()
    cams = resize_cam(small, size)
    score = None if first.ood_score is None else float(first.ood_score[0])
    return _Maps(
        decision, explained, cams, explainer.layer, explainer.runs, t1 - t0,
        time.perf_counter() - t1, score, small if params.heatmap != "image" else None,
    )


def _occlusion_maps(
    model: OnnxModel, batch: np.ndarray, params: ExplainParams, size: tuple[int, int]
) -> _Maps:
    """Occlusion sensitivity from the classifier alone: one run for the decision, then
    one per 32 occluded copies (of the image, and of its mirror with `smooth`)."""
    t0 = time.perf_counter()
    first = model.classify(batch)
    probs = first.probabilities
    decision = decide(probs[0], model.spec)
    explained = decision.class_index if params.target is None else params.target
    method = OcclusionSensitivity()
    targets = np.full((batch.shape[0],), explained, dtype=np.int64)
    drops = method.drops(model.predict, batch, targets, base=probs[:, explained])
    t1 = time.perf_counter()
    cams = method.maps(drops, size)
    small = method.maps(drops) if params.heatmap != "image" else None
    score = None if first.ood_score is None else float(first.ood_score[0])
    return _Maps(
        decision, explained, cams, IMAGE_INPUT, 0, t1 - t0, time.perf_counter() - t1, score,
        small,
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
    # smooth: the image and its left-right mirror as ONE batch.
    mirrored = np.flip(x, axis=spec.preprocessing.width_axis)
    batch = np.ascontiguousarray(np.concatenate([x, mirrored])) if params.smooth else x

    if params.method == OCCLUSION:
        maps = _occlusion_maps(model, batch, params, decoded.size)
        # Its own series: tens of classifier runs would skew the classifier's.
        metrics.inference.labels(graph="occlusion").observe(maps.inference_s)
    elif uses_attribution(params.method, params.layer, model):
        maps = _attribution_maps(model, batch, params, decoded.size)
        metrics.inference.labels(graph="attribution").observe(maps.inference_s)
    else:
        maps = _gradcam_maps(model, batch, params, decoded.size)
        metrics.inference.labels(graph="gradcam").observe(maps.inference_s)
    decision, explained, cams = maps.decision, maps.explained, maps.cams

    t1 = time.perf_counter()
    cam = flip_smoothed(cams[0], cams[1]) if params.smooth else cams[0]
    raw = None
    if maps.small is not None:
        small = maps.small
        small_cam = flip_smoothed(small[0], small[1]) if params.smooth else small[0]
        raw = raw_cam(small_cam, params.heatmap)
    # Where the returned map lies against the head, on the image it is drawn over.
    head = check_head(decoded.pixels, cam, meaningful=explained != negative_index(spec))
    t2 = time.perf_counter()
    images = params.images
    encoded: dict[str, str] = {}
    if images:
        heat = colorize(cam, params.colormap)
        # The overlay is blended only when returned or drawn into the panels.
        overlay = blend(decoded.pixels, heat, params.alpha) if images - {"heatmap"} else None
        pictures = {
            "overlay": overlay,
            "heatmap": heat,
            "panels": panels(decoded.pixels, heat, overlay) if overlay is not None else None,
        }
        fmt, level = params.image_format, params.png_compression
        # The fields are named by format (overlay_png, overlay_webp, ...).
        encoded = {
            f"{name}_{fmt}": to_base64(picture, fmt, level)
            for name, picture in pictures.items()
            if name in images and picture is not None
        }
    t3 = time.perf_counter()

    return ExplainResponse(
        **_decision_fields(decision, spec, maps.ood_score),
        input=_input_info(decoded),
        target=Target(class_index=explained, label=spec.labels[explained]),
        method=params.method,
        layer=maps.layer,
        colormap=params.colormap,
        alpha=params.alpha,
        smooth=params.smooth,
        gradcam_runs=maps.gradcam_runs,
        image_format=params.image_format,
        cam=raw,
        heat_outside_head=head.heat_outside_head,
        heat_on_rim=head.heat_on_rim,
        warnings=answer_warnings(ood_verdict(maps.ood_score, spec), head),
        timing_ms=ExplainTiming(
            decode=_ms(prepared.decode_s),
            preprocess=_ms(prepared.preprocess_s),
            inference=_ms(maps.inference_s),
            cam=_ms(maps.cam_s + t2 - t1),
            encode=_ms(t3 - t2),
            total=_ms(time.perf_counter() - started),
        ),
    ).model_copy(update=encoded)  # the image fields (all str)


def answer_warnings(verdict: OodVerdict | None, head: HeadCheck | None) -> list[AnswerWarning]:
    """/explain's `warnings`: the gate's (as `in_distribution` says), then the map's."""
    ood = None if verdict is None else verdict.warning()
    found = [ResultWarning("out_of_distribution", ood)] if ood else []
    found += head_warnings(head)
    return [AnswerWarning(code=w.code, detail=w.text) for w in found]


def warmup(model: OnnxModel) -> None:
    """Run /predict's and /explain's whole path once on a synthetic image.

    `OnnxModel.warmup` covers ONNX Runtime; this also pays OpenCV's one-off costs
    (codec and font initialisation: tens to hundreds of ms) before the first request.
    """
    h, w = model.spec.preprocessing.height, model.spec.preprocessing.width
    ramp = np.linspace(0, 255, h * w, dtype=np.float32).reshape(h, w).astype(np.uint8)
    data = encode_png(ramp)
    scratch = Metrics()  # not the app's: warm-up runs are not traffic
    method = default_method(model.has_gradcam)
    params = ExplainParams(
        None, method, "jet", 0.4, smooth=False, png_compression=None,
        images=frozenset(IMAGES), heatmap="raw",
    )
    predict(model, scratch, data, None, time.perf_counter())
    explain(model, scratch, data, None, params, time.perf_counter())
    tiny = np.zeros((8, 8, 3), dtype=np.uint8)
    for image_format in IMAGE_FORMATS:  # each encoder's first call loads/initialises it
        encode_image(tiny, image_format)


def warm_thread() -> None:
    """The per-thread part of the warm-up: OpenCV's text rendering (panel titles)."""
    tiny = np.zeros((16, 16), dtype=np.uint8)
    panels(tiny, tiny, tiny)
