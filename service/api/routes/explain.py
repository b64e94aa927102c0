"""POST /explain: the decision plus a class activation map, from one gradcam.onnx run
(or, by occlusion, from classifier runs alone)."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Form, Response

from braincam.cam import CLASSIFIER_METHODS, METHODS
from braincam.errors import InvalidParameter
from braincam.explainers import PIXEL_METHODS
from braincam.overlay import COLORMAPS, IMAGE_FORMATS, ImageFormat
from service import pipeline
from service.api.deps import MetricsDep, ModelDep, RuntimeDep, SettingsDep
from service.api.routes.predict import FileField, SliceField, json_bytes
from service.errors import error_responses
from service.ood_gate import apply_policy
from service.schemas import ExplainResponse
from service.uploads import read_upload

router = APIRouter(tags=["inference"])

DEFAULT_COLORMAP = "jet"
DEFAULT_ALPHA = 0.4


@router.post(
    "/explain",
    response_model=ExplainResponse,
    summary="Classify an MRI slice and explain the decision with a heatmap",
    responses=error_responses(400, 413, 415, 422, 500, 503),
)
async def explain(
    model: ModelDep,
    runtime: RuntimeDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    file: FileField,
    slice_index: SliceField = None,
    target: Annotated[
        str | None,
        Form(
            description="Class to explain, by label or index; default: the decided class.",
            examples=["glioma"],
        ),
    ] = None,
    method: Annotated[
        str | None,
        Form(
            description="CAM method (default: gradcam, or occlusion for a model without a "
            "Grad-CAM graph): the Grad-CAM family needs the model's Grad-CAM graph; "
            "occlusion needs only the classifier (always offered for a model without a "
            "Grad-CAM graph, for the others when BRAINCAM_OCCLUSION=true). /metadata's "
            "cam_methods lists what the served model offers.",
            json_schema_extra={"enum": [*METHODS, *CLASSIFIER_METHODS, *PIXEL_METHODS]},
        ),
    ] = None,
    layer: Annotated[
        str | None,
        Form(
            description="Layer to explain (a CAM method, or layercam for one layer rather "
            "than fused); layers other than the Grad-CAM graph's need the model's "
            "attribution graph. /metadata's cam_layers lists them.",
            examples=["block3_relu"],
        ),
    ] = None,
    samples: Annotated[
        int | None,
        Form(
            description="smoothgrad: noisy copies; integrated_gradients: path steps "
            "(default 8, at most 64), all run as one batch.",
        ),
    ] = None,
    alpha: Annotated[
        float, Form(ge=0.0, le=1.0, description="Heatmap opacity in the overlay.")
    ] = DEFAULT_ALPHA,
    colormap: Annotated[
        str,
        Form(description="OpenCV colormap name.", json_schema_extra={"enum": list(COLORMAPS)}),
    ] = DEFAULT_COLORMAP,
    smooth: Annotated[
        bool,
        Form(
            description="Average the map with the map of the left-right mirrored image "
            "(both run as one batch of 2)."
        ),
    ] = False,
    images: Annotated[
        str | None,
        Form(
            description="Which base64 images to return, comma-separated: overlay, heatmap, "
            "panels (Original | Heatmap | Overlay), all, or none. Each costs its encoding. "
            "Default: overlay, or none with `heatmap=raw|list`.",
            examples=["overlay,heatmap"],
        ),
    ] = None,
    image_format: Annotated[
        str,
        Form(
            description="Format of the images: png (lossless, the default), webp "
            "(lossless, ~1.8x smaller, ~10x slower to write) or jpeg (lossy, smallest). "
            "The fields are named by format: overlay_png, overlay_webp, overlay_jpeg.",
            json_schema_extra={"enum": list(IMAGE_FORMATS)},
        ),
    ] = "png",
    heatmap: Annotated[
        str,
        Form(
            description="image: only the images; raw: also the map at the explained "
            "layer's resolution in `cam` (base64 little-endian float32, h*w row-major); "
            "list: the same as a JSON list of rows. Costs no image encoding.",
            json_schema_extra={"enum": list(pipeline.HEATMAP_MODES)},
        ),
    ] = "image",
) -> Response:
    """The /predict fields, the explained class, and base64 images (PNG unless
    `image_format` says otherwise) at the size of the uploaded image: the overlay, and
    on request (`images`) the coloured heatmap and a three-panel figure; with
    `heatmap=raw` the map itself, small, for a client to render.

    Prediction and explanation come from one run of the Grad-CAM graph. Only when the
    decided class is not the graph's argmax (a binary model's threshold decided
    otherwise, or with `smooth` the mirrored image's argmax differs) and no `target`
    was given, the affected images are run once more with the decided class as target:
    `gradcam_runs` says how many runs there were.

    `method=occlusion` needs no Grad-CAM graph: the classifier runs once for the
    decision, then on copies of the image with a patch (1/8 of each side, stride half
    of it) filled with the image's mean, 32 per run; the map is the drop in the
    explained class's probability. Costlier: tens of runs per image.

    With the model's attribution graph (attribution.onnx): `layer` picks another layer
    for a CAM method, `method=layercam` fuses LayerCAM over its layers, and
    `method=smoothgrad|integrated_gradients` give pixel-resolution maps from the
    gradient with respect to the image (`samples` copies in one batch).
    """
    started = time.perf_counter()
    # Parameters are checked before the upload is touched: a typo costs no inference.
    heatmap_mode = pipeline.resolve_heatmap(heatmap)
    method_name = pipeline.resolve_method(method, model, settings.occlusion)
    params = pipeline.ExplainParams(
        target=pipeline.resolve_target(target, model.spec),
        method=method_name,
        layer=pipeline.resolve_layer(layer, method_name, samples, model),
        samples=samples,
        colormap=_colormap(colormap),
        alpha=alpha,
        smooth=smooth,
        png_compression=settings.png_compression,
        images=pipeline.resolve_images(images, heatmap_mode),
        image_format=_image_format(image_format),
        heatmap=heatmap_mode,
    )
    data = await read_upload(file, settings.max_upload_bytes)
    metrics.upload_bytes.observe(len(data))
    result = await runtime.run(pipeline.explain, model, metrics, data, slice_index, params, started)
    apply_policy(result, settings, metrics, "/explain")
    return json_bytes(result)


def _image_format(name: str) -> ImageFormat:
    key = name.strip().lower()
    for known in IMAGE_FORMATS:
        if key == known or (key == "jpg" and known == "jpeg"):
            return known
    raise InvalidParameter(
        f"unknown image_format {name[:16]!r}; choose from {', '.join(IMAGE_FORMATS)}"
    )


def _colormap(name: str) -> str:
    key = name.strip().lower()
    if key not in COLORMAPS:
        raise InvalidParameter(
            f"unknown colormap {name[:64]!r}; valid colormaps: {', '.join(COLORMAPS)}"
        )
    return key
