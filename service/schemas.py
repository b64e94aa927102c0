"""Response models: they are the JSON contract and the OpenAPI schemas."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorResponse(BaseModel):
    """Every error, whatever its status: a readable message and a stable machine code."""

    detail: str = Field(examples=["unrecognised file type: send PNG, JPEG, ..."])
    code: str = Field(examples=["unsupported_media_type"])


class ModelRef(BaseModel):
    name: str = Field(examples=["demo"])
    version: str = Field(examples=["1"])
    notice: str | None = Field(
        default=None,
        description="what the model's training data means for its answers (model.json "
        "`notice`; the demo model: trained on synthetic lesions, never saw a real scan)",
    )


class InputInfo(BaseModel):
    """What the upload turned out to be (sniffed from its bytes, never its name)."""

    format: str = Field(examples=["png"], description="png, jpeg, bmp, tiff, dicom or nifti")
    width: int = Field(examples=[512], description="width of the decoded 2-D image")
    height: int = Field(examples=[512])
    bit_depth: int = Field(examples=[8], description="bits per sample as stored in the file")
    slice: int | None = Field(default=None, description="slice/frame used, for DICOM and NIfTI")
    n_slices: int | None = Field(default=None, description="slices/frames in the volume")


class PredictTiming(BaseModel):
    """Milliseconds per stage; `total` runs from the handler's start to the response
    (including any wait for an inference slot, excluding multipart parsing)."""

    decode: float
    preprocess: float
    inference: float
    total: float


class ExplainTiming(PredictTiming):
    cam: float
    encode: float


class PredictResponse(BaseModel):
    label: str = Field(examples=["glioma"])
    class_index: int = Field(examples=[0])
    confidence: float = Field(examples=[0.93], description="probability of `label`")
    probabilities: dict[str, float] = Field(
        examples=[{"glioma": 0.93, "meningioma": 0.04, "notumor": 0.02, "pituitary": 0.01}]
    )
    model: ModelRef
    timing_ms: PredictTiming
    input: InputInfo
    # The out-of-distribution gate (model.json `ood`); null for models exported without.
    ood_score: float | None = Field(
        default=None,
        examples=[12.3],
        description="how unlike the training images the input is (higher = more unusual)",
    )
    ood_threshold: float | None = Field(
        default=None,
        examples=[41.7],
        description="scores above it are out of distribution (95 % of held-out "
        "in-distribution images score below it)",
    )
    in_distribution: bool | None = Field(
        default=None,
        description="false: the input is unlike what the model was trained on, and its "
        "answer should not be trusted (BRAINCAM_OOD_POLICY=reject refuses such inputs)",
    )


class Target(BaseModel):
    class_index: int
    label: str


class RawCam(BaseModel):
    """The explained layer's class activation map, before resizing and colouring."""

    shape: list[int] = Field(examples=[[9, 9]], description="[h, w] of the explained layer")
    dtype: Literal["float32"] = "float32"
    encoding: Literal["base64", "list"] = Field(
        description="base64: the h*w little-endian float32 values, row-major; "
        "list: `data` is a JSON list of h rows"
    )
    data: str | list[list[float]] = Field(description="the values, in [0, 1]")


class AnswerWarning(BaseModel):
    """Something a reader of the answer must know; DICOM results carry the same text."""

    code: str = Field(examples=["out_of_distribution"])
    detail: str = Field(
        examples=["3 of 12 slices are unlike the images the model was trained on and were "
                  "left out of the series decision"]
    )


# Where the explanation's map lies against the head (braincam/head.py); /explain and
# /explain/series (the deciding slice, and each slice with an overlay).
HEAT_OUTSIDE_HEAD_DOC = (
    "share (0..1) of the heatmap's mass outside the head found in the image; above 0.5 "
    "`warnings` says the explanation lies mostly outside the head (not for the "
    "no-finding class); null: a flat map, or no head found"
)
HEAT_ON_RIM_DOC = "share (0..1) of the heatmap's mass on the head's outer band (skull, scalp)"


class ExplainResponse(PredictResponse):
    timing_ms: ExplainTiming
    target: Target = Field(description="the class the heatmap explains")
    method: str = Field(examples=["gradcam"])
    layer: str = Field(
        examples=["conv2d_3"],
        description="the layer whose activations are used ('image' for occlusion)",
    )
    colormap: str = Field(examples=["jet"])
    alpha: float = Field(examples=[0.4])
    smooth: bool = Field(description="averaged with the horizontally flipped image's map")
    gradcam_runs: int = Field(
        examples=[1],
        description="runs of gradcam.onnx: 1, or 2 when the decided class had to be "
        "re-explained (binary threshold overriding argmax, or a flip changing the class); "
        "0 for occlusion, which runs the classifier only",
    )
    image_format: Literal["png", "webp", "jpeg"] = Field(
        default="png", description="the format of the returned images (`image_format`)"
    )
    cam: RawCam | None = Field(
        default=None, description="the raw map (`heatmap=raw` or `heatmap=list`)"
    )
    # Each image is encoded only when asked for (`images`), in `image_format`: the
    # field's suffix names the format, so a field never holds another format.
    overlay_png: str | None = Field(
        default=None, description="base64 PNG: the image with the heatmap blended"
    )
    heatmap_png: str | None = Field(
        default=None, description="base64 PNG: the colourised heatmap (`images=heatmap`)"
    )
    panels_png: str | None = Field(
        default=None, description="base64 PNG: Original | Heatmap | Overlay (`images=panels`)"
    )
    overlay_webp: str | None = Field(default=None, description="as overlay_png, lossless WebP")
    heatmap_webp: str | None = Field(default=None, description="as heatmap_png, lossless WebP")
    panels_webp: str | None = Field(default=None, description="as panels_png, lossless WebP")
    overlay_jpeg: str | None = Field(default=None, description="as overlay_png, JPEG (lossy)")
    heatmap_jpeg: str | None = Field(default=None, description="as heatmap_png, JPEG (lossy)")
    panels_jpeg: str | None = Field(default=None, description="as panels_png, JPEG (lossy)")
    heat_outside_head: float | None = Field(
        default=None, examples=[0.03], description=HEAT_OUTSIDE_HEAD_DOC
    )
    heat_on_rim: float | None = Field(default=None, examples=[0.08], description=HEAT_ON_RIM_DOC)
    warnings: list[AnswerWarning] = Field(
        default_factory=list,
        description="what a reader must know: out_of_distribution (the gate flagged the "
        "image), heat_outside_head (the explanation lies mostly outside the head)",
    )


class ProviderInfo(BaseModel):
    requested: list[str]
    available: list[str]
    active: list[str]


class HealthResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"description": "Always 200 while alive."})

    status: Literal["ok", "loading", "error"]
    ready: bool
    model: ModelRef | None = None
    error: str | None = Field(default=None, description="why the model could not be loaded")
    providers: list[str] = Field(
        default_factory=list,
        description="execution providers the model really runs on (empty until loaded)",
    )
    execution_providers: ProviderInfo | None = None
    gpu: bool = False
    warnings: list[str] = Field(default_factory=list)
    load_seconds: float | None = Field(default=None, description="model loading + warm-up time")
    version: str = Field(description="braincam version")


class ReadyResponse(BaseModel):
    ready: bool
    status: Literal["ok", "loading", "error"]


class LiveResponse(BaseModel):
    live: bool = True


class Limits(BaseModel):
    max_upload_bytes: int
    max_concurrency: int
    formats: list[str]


class BatchingInfo(BaseModel):
    setting: Literal["auto", "on", "off"] = Field(description="BRAINCAM_BATCHING")
    active: bool = Field(description="whether requests are micro-batched")
    reason: str
    max_size: int
    max_wait_ms: float


class OodInfo(BaseModel):
    """The served model's out-of-distribution gate."""

    detector: str = Field(examples=["mahalanobis"])
    threshold: float
    policy: Literal["warn", "reject"] = Field(description="BRAINCAM_OOD_POLICY")
    target_pass_rate: float = Field(description="share of in-distribution images meant to pass")
    held_out_pass_rate: float = Field(description="share of held-out images that passed")
    fit_size: int
    held_out_size: int
    fit_data: str
    description: str


class MetadataResponse(BaseModel):
    model: dict[str, Any] = Field(description="model.json of the served model")
    out_of_distribution: OodInfo | None = Field(
        default=None, description="null: the model was exported without a detector"
    )
    temperature: float | None = Field(
        default=None, description="temperature scaling applied inside the graphs (1: none)"
    )
    providers: ProviderInfo
    gpu: bool
    batching: BatchingInfo | None = None
    cam_methods: list[str]
    cam_layers: list[str] = Field(
        default_factory=list,
        description="layers /explain's `layer` can name (the Grad-CAM graph's first)",
    )
    colormaps: list[str]
    defaults: dict[str, Any]
    limits: Limits
    disclaimer: str


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadataV2(BaseModel):
    """Open Inference Protocol model metadata."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadataV2(BaseModel):
    name: str
    version: str
    extensions: list[str] = Field(default_factory=list)


class SliceResult(BaseModel):
    """One slice of a series, in series order (along the slice normal)."""

    index: int = Field(description="position in the ordered series, 0 = first")
    label: str
    class_index: int
    confidence: float
    probabilities: dict[str, float]
    position_mm: float | None = Field(
        default=None,
        description="ImagePositionPatient projected on the slice normal (DICOM); "
        "the axial slice index for NIfTI",
    )
    sop_instance_uid: str | None = Field(default=None, description="source instance (DICOM)")
    frame: int | None = Field(default=None, description="frame of a multi-frame instance")
    overlay_png: str | None = Field(
        default=None, description="base64 PNG overlay (/explain/series, requested slices)"
    )
    ood_score: float | None = Field(
        default=None, description="out-of-distribution score (models with a detector)"
    )
    ood_threshold: float | None = None
    in_distribution: bool | None = Field(
        default=None,
        description="false: the slice is unlike the training images; it is left out of "
        "the series rule unless every slice is",
    )
    heat_outside_head: float | None = Field(
        default=None, description="of the slice's overlay: " + HEAT_OUTSIDE_HEAD_DOC
    )
    heat_on_rim: float | None = Field(default=None, description=HEAT_ON_RIM_DOC)


class SeriesInfo(BaseModel):
    format: Literal["dicom", "nifti"]
    n_slices: int
    ordered_by: Literal["position", "instance_number", "upload", "volume"] = Field(
        description="position: along the slice normal; instance_number or upload order "
        "only when the geometry is missing"
    )
    series_instance_uid: str | None = None
    study_instance_uid: str | None = None
    skipped: dict[str, int] = Field(
        default_factory=dict,
        description="files left out, by reason (not_dicom, not_an_image)",
        examples=[{"not_an_image": 1}],
    )


class SeriesTiming(BaseModel):
    read: float = Field(description="unzip, parse, order and decode every slice")
    preprocess: float
    inference: float = Field(description="the classifier over all slices, in batches")
    explain: float = Field(description="Grad-CAM of the explained slices (0 when none)")
    dicom: float = Field(description="building the DICOM results (0 unless output=dicom)")
    total: float


class DicomObject(BaseModel):
    kind: Literal["sr", "secondary_capture"]
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    data_base64: str = Field(description="the DICOM file (Part 10), base64")


class SeriesResponse(BaseModel):
    """The series' decision (see `rule`), every slice's, and on request DICOM results."""

    label: str = Field(examples=["glioma"])
    class_index: int
    confidence: float
    probabilities: dict[str, float] = Field(description="of the deciding slice")
    deciding_slice: int = Field(description="index (in `slices`) of the slice deciding")
    rule: str = Field(description="how the series decision is made from the slices")
    # The out-of-distribution gate over the series (null for models without a detector).
    in_distribution: bool | None = Field(
        default=None,
        description="false: the gate flagged every slice, so the decision rests on slices "
        "unlike the training images and should not be trusted (BRAINCAM_OOD_POLICY=reject "
        "refuses such series); true: the decision rests on slices the gate passed",
    )
    flagged_slices: int | None = Field(
        default=None, description="slices the gate flagged (left out of the rule unless all are)"
    )
    ood_score: float | None = Field(default=None, description="of the deciding slice")
    ood_threshold: float | None = None
    heat_outside_head: float | None = Field(
        default=None, description="of the deciding slice's map: " + HEAT_OUTSIDE_HEAD_DOC
    )
    heat_on_rim: float | None = Field(default=None, description=HEAT_ON_RIM_DOC)
    warnings: list[AnswerWarning] = Field(
        default_factory=list,
        description="what a reader must know (out_of_distribution, heat_outside_head); "
        "the SR of output=dicom carries each one too",
    )
    model: ModelRef
    series: SeriesInfo
    slices: list[SliceResult]
    batches: int = Field(description="classifier runs (slices go in batches)")
    method: str | None = Field(default=None, description="CAM method (/explain/series)")
    overlay_png: str | None = Field(
        default=None, description="base64 PNG: the deciding slice's overlay (/explain/series)"
    )
    dicom: list[DicomObject] | None = Field(
        default=None,
        description="output=dicom: a Comprehensive SR and an RGB Secondary Capture of the "
        "overlay, new series of the input's study (research use only)",
    )
    timing_ms: SeriesTiming
    disclaimer: str
