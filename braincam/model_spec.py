"""The model directory contract: `classifier.onnx`, `gradcam.onnx`, `model.json`.

A model directory is self-describing and can be copied anywhere (like a Triton
model repository entry). `ModelSpec` is the schema of `model.json`; the exporter
writes it, the service and the evaluation tools read it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from braincam import DISCLAIMER
from braincam.preprocessing import Preprocessing

MODEL_JSON = "model.json"
CLASSIFIER_ONNX = "classifier.onnx"
GRADCAM_ONNX = "gradcam.onnx"
ATTRIBUTION_ONNX = "attribution.onnx"
SCHEMA_VERSION = 1

# Tensor names of the two graphs: the exporter writes them, the service reads them.
IMAGE_INPUT = "image"
TARGET_INPUT = "target"
PROBABILITIES_OUTPUT = "probabilities"
CLASS_OUTPUT = "class_index"
ACTIVATIONS_OUTPUT = "activations"
GRADIENTS_OUTPUT = "gradients"
# Both graphs of a model with an out-of-distribution detector also output this [N].
OOD_SCORE_OUTPUT = "ood_score"
# attribution.onnx (optional): per layer activations_<i>/gradients_<i>, and this.
IMAGE_GRADIENTS_OUTPUT = "image_gradients"

Task = Literal["multiclass", "binary"]


class DataFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str
    sha256: str
    size_bytes: int


class GraphFile(DataFile):
    inputs: dict[str, list[int | None]]
    outputs: dict[str, list[int | None]]


class Graphs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    classifier: GraphFile
    # None: the model has no Grad-CAM graph and is explained by occlusion only.
    gradcam: GraphFile | None = None
    # Weights both graphs share, stored once (ONNX external data); None when inline.
    weights: DataFile | None = None
    # Several layers and the image gradient in one run (`python -m exporter attribution`).
    attribution: GraphFile | None = None

    def files(self) -> list[DataFile]:
        return [f for f in (self.classifier, self.gradcam, self.weights, self.attribution)
                if f is not None]


class Explanation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layer: str = Field(description="layer (Keras) or tensor (ONNX) whose activations are explained")
    activation_shape: list[int] = Field(description="[h, w, channels] of that layer")
    # What the gradients differentiate: the pre-softmax logit of the class, or, for a
    # model whose graph yields only probabilities, the log-probability (same ranking).
    score: Literal["logit", "log_probability"] = "logit"


class AttributionLayer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="what a request names with layer=")
    tensor: str = Field(description="the graph tensor")
    activation_shape: list[int] = Field(description="[h, w, channels]")
    activations: str = Field(description="attribution.onnx output, NHWC")
    gradients: str = Field(description="attribution.onnx output, NHWC")


class Attribution(BaseModel):
    """attribution.onnx: activations and gradients at several layers and the gradient of
    the class score with respect to the image, from one run (same inputs as gradcam.onnx)."""

    model_config = ConfigDict(extra="forbid")

    layers: list[AttributionLayer] = Field(min_length=1)
    image_gradients: str = IMAGE_GRADIENTS_OUTPUT
    score: str = Field(default="logit", description="what the gradients differentiate")
    gate: dict[str, Any] = Field(default_factory=dict)

    def layer(self, name: str) -> AttributionLayer | None:
        return next((la for la in self.layers if name in (la.name, la.tensor)), None)


class Decision(BaseModel):
    """How probabilities become a label. Binary models use a tuned threshold."""

    model_config = ConfigDict(extra="forbid")

    positive_label: str | None = None
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    threshold_method: str | None = None


class Quantization(BaseModel):
    """How classifier.onnx was quantised to INT8 (`python -m exporter quantize`)."""

    model_config = ConfigDict(extra="forbid")

    classifier: Literal["int8"] = "int8"
    method: str = Field(description="e.g. static QDQ, onnxruntime.quantization")
    activations: str = Field(description="QInt8 or QUInt8")
    weights: str = Field(description="QInt8")
    per_channel: bool
    reduce_range: bool
    calibration_method: str
    calibration_images: int
    top1_agreement: float = Field(description="decisions equal to the float model's, 0..1")
    max_probability_diff: float
    min_top1_agreement: float = Field(description="the gate the export passed")
    ood_flag_agreement: float | None = Field(
        default=None, description="OOD flags equal to the float model's (models with a gate)"
    )
    gradcam: str = Field(description="what the Grad-CAM graph runs in, and why")
    float_classifier_sha256: str


class OodDetector(BaseModel):
    """The out-of-distribution gate: the graphs output `output`, inputs above `threshold`
    are flagged. Fitted at export on the model's penultimate features."""

    model_config = ConfigDict(extra="forbid")

    detector: Literal["mahalanobis", "energy"]
    threshold: float = Field(description="scores above it are out of distribution")
    target_pass_rate: float = Field(default=0.95, gt=0.0, le=1.0)
    held_out_pass_rate: float = Field(description="share of held-out images under the threshold")
    fit_size: int = Field(ge=0, description="images the statistics were fitted on")
    held_out_size: int = Field(ge=0, description="in-distribution images the threshold was set on")
    fit_data: str = Field(default="", description="where the fit and held-out images came from")
    output: str = OOD_SCORE_OUTPUT
    features: str = Field(default="", description="graph tensor of the penultimate features")
    feature_dim: int | None = None
    logits: str = Field(default="", description="graph tensor of the pre-softmax scores")
    gaussians: int | None = Field(default=None, description="class-conditional means (Mahalanobis)")
    shrinkage: float | None = Field(default=None, description="Ledoit-Wolf shrinkage")
    rank: int | None = Field(
        default=None, description="covariance directions weighted on their own (the rest share one)"
    )


class Calibration(BaseModel):
    """Temperature scaling: the graphs' probabilities are softmax(logits / temperature)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["temperature"] = "temperature"
    temperature: float = Field(gt=0.0)
    fit_size: int = Field(ge=0)
    fit_data: str = ""
    at_bound: bool = Field(default=False, description="the fit stopped at the search bound")
    # On the fit set, before (T = 1) and after: ECE (15 bins), Brier score, NLL.
    figures: dict[str, float] = Field(default_factory=dict)


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    name: str
    version: str = "1"
    task: Task = "multiclass"
    labels: list[str] = Field(min_length=2)
    preprocessing: Preprocessing
    decision: Decision = Field(default_factory=Decision)
    explanation: Explanation
    graphs: Graphs
    opset: int
    parity: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    exported_at: str = ""
    source: dict[str, Any] = Field(default_factory=dict)
    # How the model was made (trainer version, seed, epochs, data, test metrics,
    # explanation quality): written by `make model` for the shipped demo model.
    provenance: dict[str, Any] = Field(default_factory=dict)
    # What anyone reading this model's answers must know about its training data,
    # shown beside every answer (API, web page, CLI). Set for the demo model.
    notice: str | None = None
    disclaimer: str = DISCLAIMER
    # None: both graphs float32, as exported.
    quantization: Quantization | None = None
    # Optional (older model.json files have neither): see OodDetector, Calibration.
    ood: OodDetector | None = None
    calibration: Calibration | None = None
    # Optional: older model.json files have none (then graphs.attribution is None too).
    attribution: Attribution | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        if self.task == "binary":
            if len(self.labels) != 2:
                raise ValueError("a binary model has exactly two labels")
            if self.decision.positive_label not in self.labels:
                raise ValueError("binary models name their positive label in decision")
        return self

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.preprocessing.input_shape

    def label_index(self, label: str) -> int:
        return self.labels.index(label)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_spec(model_dir: str | Path, verify: bool = True) -> ModelSpec:
    """Read `model.json`; with `verify`, check its graphs exist and match their sha256."""
    model_dir = Path(model_dir)
    path = model_dir / MODEL_JSON
    if not path.is_file():
        raise FileNotFoundError(f"no {MODEL_JSON} in {model_dir}")
    spec = ModelSpec.model_validate(json.loads(path.read_text()))
    if verify:
        for graph in spec.graphs.files():
            file = model_dir / graph.file
            if not file.is_file():
                raise FileNotFoundError(f"{file} is listed in {MODEL_JSON} but missing")
            if sha256_file(file) != graph.sha256:
                raise ValueError(f"{file} does not match the sha256 recorded in {MODEL_JSON}")
    return spec


def save_spec(spec: ModelSpec, model_dir: str | Path) -> Path:
    path = Path(model_dir) / MODEL_JSON
    path.write_text(json.dumps(spec.model_dump(mode="json"), indent=2) + "\n")
    return path
