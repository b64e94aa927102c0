"""Open Inference Protocol (KServe v2) tensors over the two graphs of the model.

The served model directory appears as two OIP models, named as
`python -m exporter triton` names them in a Triton repository, so a client
switches between this service and Triton by changing the URL only:

- `NAME`: classifier.onnx; input `image` FP32 [N,H,W,C] (preprocessed as
  model.json says); output `probabilities` FP32 [N,K].
- `NAME-gradcam`: gradcam.onnx; inputs `image` and `target` INT64 [N] (-1: the
  predicted class); outputs `probabilities`, `class_index` INT64 [N],
  `activations` and `gradients` FP32 [N,h,w,C].
- `NAME-attribution` (models with attribution.onnx): inputs as `NAME-gradcam`; outputs
  `probabilities`, `class_index`, `activations_<i>` / `gradients_<i>` per layer (model.json
  `attribution.layers`) and `image_gradients` in the model's input layout.

Tensors are JSON (`data` flat in row-major order, or nested), or raw bytes after
the JSON header with the binary tensor data extension (Triton's
`Inference-Header-Content-Length`), which is what tritonclient sends by default.
Everything here is blocking work: the route runs it in the worker pool.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from braincam.inference import OnnxModel
from braincam.model_spec import TARGET_INPUT
from service.errors import ServiceError
from service.metrics import Metrics

GRADCAM_SUFFIX = "-gradcam"  # the Triton repository uses the same (exporter/triton.py)
ATTRIBUTION_SUFFIX = "-attribution"
# Bounds one request's work and response size (the gradcam outputs of one
# 150x150 image are ~1 MB of JSON); also the Triton configs' max_batch_size.
MAX_BATCH_SIZE = 32
HEADER_LENGTH = "inference-header-content-length"

# ONNX Runtime type strings <-> OIP datatypes <-> numpy.
_OIP_TYPES = {
    "tensor(float)": "FP32",
    "tensor(float16)": "FP16",
    "tensor(double)": "FP64",
    "tensor(int64)": "INT64",
    "tensor(int32)": "INT32",
    "tensor(int8)": "INT8",
    "tensor(uint8)": "UINT8",
    "tensor(bool)": "BOOL",
}
NUMPY_TYPES: dict[str, type[np.generic]] = {
    "FP32": np.float32,
    "FP16": np.float16,
    "FP64": np.float64,
    "INT64": np.int64,
    "INT32": np.int32,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}


class InferenceRequestError(ServiceError):
    """A request the protocol rejects: 400, as Triton and KServe answer."""

    def __init__(self, detail: str) -> None:
        super().__init__(400, "invalid_inference_request", detail)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]  # -1: any size (the batch)


@dataclass(frozen=True)
class ProtocolModel:
    name: str
    version: str
    graph: str  # "classifier", "gradcam" or "attribution"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)


def _tensors(args: Sequence[Any]) -> list[TensorSpec]:
    return [
        TensorSpec(
            arg.name,
            _OIP_TYPES.get(arg.type, arg.type),
            [d if isinstance(d, int) and d > 0 else -1 for d in arg.shape],
        )
        for arg in args
    ]


# Per loaded model, computed once: every /v2 request looks its model up here.
@functools.lru_cache(maxsize=4)
def protocol_models(model: OnnxModel) -> Mapping[str, ProtocolModel]:
    """The OIP models of the served directory, described by the graphs themselves."""
    spec = model.spec
    models = [
        ProtocolModel(
            spec.name,
            spec.version,
            "classifier",
            _tensors(model.classifier.get_inputs()),
            _tensors(model.classifier.get_outputs()),
        )
    ]
    if model.gradcam_session is not None:  # a model without a Grad-CAM graph has one model
        models.append(
            ProtocolModel(
                spec.name + GRADCAM_SUFFIX,
                spec.version,
                "gradcam",
                _tensors(model.gradcam_session.get_inputs()),
                _tensors(model.gradcam_session.get_outputs()),
            )
        )
    if model.attribution_session is not None:
        models.append(
            ProtocolModel(
                spec.name + ATTRIBUTION_SUFFIX,
                spec.version,
                "attribution",
                _tensors(model.attribution_session.get_inputs()),
                _tensors(model.attribution_session.get_outputs()),
            )
        )
    return {m.name: m for m in models}


def find_model(model: OnnxModel, name: str, version: str | None = None) -> ProtocolModel:
    found = protocol_models(model).get(name)
    if found is None:
        raise ServiceError(404, "model_not_found", f"model {name[:64]!r} is not served here")
    if version is not None and version != found.version:
        raise ServiceError(
            404, "model_not_found", f"model {name!r} has no version {version[:16]!r}"
        )
    return found


# --- request --------------------------------------------------------------------------


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = None


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


def _split_body(body: bytes, headers: Mapping[str, str]) -> tuple[bytes, bytes]:
    """JSON header and binary tail (binary tensor data extension)."""
    declared = headers.get(HEADER_LENGTH)
    if declared is None:
        return body, b""
    try:
        n = int(declared)
    except ValueError:
        n = -1
    if not 0 < n <= len(body):
        raise InferenceRequestError(f"Inference-Header-Content-Length {declared[:20]!r} is invalid")
    return body[:n], body[n:]


def parse_request(body: bytes, headers: Mapping[str, str]) -> tuple[InferenceRequest, bytes]:
    header, binary = _split_body(body, headers)
    try:
        payload = json.loads(header)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InferenceRequestError(f"the request is not valid JSON: {exc}") from None
    try:
        return InferenceRequest.model_validate(payload), binary
    except ValidationError as exc:
        where = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}" for e in exc.errors()
        )
        raise InferenceRequestError(f"invalid inference request: {where}") from None


def _decode_tensor(item: RequestInput, spec: TensorSpec, binary: memoryview) -> np.ndarray:
    """One input's data -> a numpy array of the declared shape, checked against the graph."""
    if item.datatype != spec.datatype:
        raise InferenceRequestError(
            f"input {item.name!r} has datatype {item.datatype[:16]!r}; the model expects "
            f"{spec.datatype}"
        )
    shape = item.shape
    if len(shape) != len(spec.shape) or any(
        want not in (-1, got) for got, want in zip(shape, spec.shape, strict=True)
    ):
        raise InferenceRequestError(
            f"input {item.name!r} has shape {shape[:8]}; the model expects {spec.shape} "
            "(-1: any size)"
        )
    if any(d < 0 for d in shape):
        raise InferenceRequestError(f"input {item.name!r} has a negative dimension")
    count = math.prod(shape)
    dtype = np.dtype(NUMPY_TYPES[spec.datatype])
    if binary.nbytes:  # this input's bytes, cut from the binary tail by the caller
        if binary.nbytes != count * dtype.itemsize:
            raise InferenceRequestError(
                f"input {item.name!r}: {binary.nbytes} bytes of binary data for shape {shape} "
                f"of {spec.datatype} ({count * dtype.itemsize} bytes)"
            )
        # Little-endian, as the extension specifies.
        return np.frombuffer(binary, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)
    if item.data is None:
        raise InferenceRequestError(f"input {item.name!r} has no data")
    try:
        raw = np.asarray(item.data)
    except ValueError:
        raise InferenceRequestError(f"input {item.name!r}: data is a ragged array") from None
    # JSON numbers only: strings, booleans and nulls are not silently converted.
    kinds = "fiu" if dtype.kind == "f" else "iu" if dtype.kind in "iu" else "b"
    if raw.size and raw.dtype.kind not in kinds:
        raise InferenceRequestError(
            f"input {item.name!r}: data must be JSON {'numbers' if kinds != 'b' else 'booleans'} "
            f"for {spec.datatype}"
        )
    if raw.size != count:
        raise InferenceRequestError(
            f"input {item.name!r}: {raw.size} values for shape {shape} ({count} expected)"
        )
    if dtype.kind == "f" and raw.size and not np.isfinite(raw).all():
        raise InferenceRequestError(f"input {item.name!r}: data contains NaN or infinity")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if raw.size and (raw.min() < info.min or raw.max() > info.max):
            raise InferenceRequestError(f"input {item.name!r}: values outside {spec.datatype}")
    return raw.astype(dtype).reshape(shape)


def decode_inputs(
    request: InferenceRequest, binary: bytes, target: ProtocolModel, n_classes: int
) -> dict[str, np.ndarray]:
    """Every input of the graph, exactly once, with one batch size; binary tensors
    are taken from the tail in input order."""
    specs = {t.name: t for t in target.inputs}
    given = [item.name for item in request.inputs]
    unknown = sorted(set(given) - set(specs))
    missing = sorted(set(specs) - set(given))
    if unknown or missing or len(given) != len(set(given)):
        raise InferenceRequestError(
            f"model {target.name!r} takes exactly the inputs {sorted(specs)}; got {given[:8]}"
        )
    view, offset = memoryview(binary), 0
    feeds: dict[str, np.ndarray] = {}
    for item in request.inputs:
        size = (item.parameters or {}).get("binary_data_size")
        chunk = view[0:0]
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(view):
                raise InferenceRequestError(
                    f"input {item.name!r}: binary_data_size does not fit the binary data"
                )
            chunk, offset = view[offset : offset + size], offset + size
            if size == 0:
                raise InferenceRequestError(f"input {item.name!r}: binary_data_size is 0")
        feeds[item.name] = _decode_tensor(item, specs[item.name], chunk)
    if offset != len(view):
        raise InferenceRequestError(f"{len(view) - offset} bytes of binary data were not used")
    batches = {array.shape[0] for array in feeds.values()}
    if len(batches) != 1:
        raise InferenceRequestError(f"inputs disagree on the batch size: {sorted(batches)}")
    (batch,) = batches
    if not 1 <= batch <= MAX_BATCH_SIZE:
        raise InferenceRequestError(f"batch size {batch} is outside 1..{MAX_BATCH_SIZE}")
    if TARGET_INPUT in feeds:
        t = feeds[TARGET_INPUT]
        if ((t < -1) | (t >= n_classes)).any():
            raise InferenceRequestError(
                f"{TARGET_INPUT} values must be -1 (the predicted class) or 0..{n_classes - 1}"
            )
    return feeds


def _wants_binary(request: InferenceRequest, out: RequestOutput | None) -> bool:
    if out is not None and out.parameters and "binary_data" in out.parameters:
        return out.parameters["binary_data"] is True
    return bool((request.parameters or {}).get("binary_data_output", False))


@dataclass(frozen=True)
class Encoded:
    body: bytes
    header_length: int | None  # set when binary outputs follow the JSON


@dataclass(frozen=True)
class PreparedInference:
    """A checked infer request: the graph's feeds and the outputs to return."""

    target: ProtocolModel
    request: InferenceRequest
    feeds: dict[str, np.ndarray]
    requested: list[RequestOutput]


def prepare_inference(
    model: OnnxModel, name: str, version: str | None, body: bytes, headers: Mapping[str, str]
) -> PreparedInference:
    """Parse and check an infer call (every failure a 4xx before any inference)."""
    target = find_model(model, name, version)
    request, binary = parse_request(body, headers)
    feeds = decode_inputs(request, binary, target, len(model.spec.labels))
    requested = request.outputs or [RequestOutput(name=t.name) for t in target.outputs]
    for out in requested:
        if target.output(out.name) is None:
            raise InferenceRequestError(
                f"model {target.name!r} has no output {out.name[:64]!r}; it has "
                f"{[t.name for t in target.outputs]}"
            )
    return PreparedInference(target, request, feeds, list(requested))


def run_inference(
    model: OnnxModel,
    metrics: Metrics,
    name: str,
    version: str | None,
    body: bytes,
    headers: Mapping[str, str],
) -> Encoded:
    """Parse, check, run the graph, encode: the whole blocking part of an unbatched call."""
    return run_prepared(model, metrics, prepare_inference(model, name, version, body, headers))


def run_prepared(model: OnnxModel, metrics: Metrics, prepared: PreparedInference) -> Encoded:
    """Run a checked request's graph on its own and encode the response."""
    graph = prepared.target.graph
    sessions = {"classifier": model.classifier, "gradcam": model.gradcam_session,
                "attribution": model.attribution_session}
    session = sessions[graph]
    assert session is not None  # protocol_models lists a graph only when loaded
    started = time.perf_counter()
    arrays = session.run([o.name for o in prepared.requested], prepared.feeds)
    metrics.inference.labels(graph=graph).observe(time.perf_counter() - started)
    return encode_outputs(prepared, [np.asarray(a) for a in arrays])


def encode_outputs(prepared: PreparedInference, arrays: Sequence[np.ndarray]) -> Encoded:
    """The response to an infer call: `arrays` in the order of `prepared.requested`."""
    request, target = prepared.request, prepared.target
    outputs: list[dict[str, Any]] = []
    tail: list[bytes] = []
    for out, array in zip(prepared.requested, arrays, strict=True):
        array = np.asarray(array)
        spec = target.output(out.name)
        assert spec is not None
        entry: dict[str, Any] = {
            "name": out.name,
            "datatype": spec.datatype,
            "shape": list(array.shape),
        }
        if _wants_binary(request, out):
            raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            entry["data"] = array.ravel().tolist()
        outputs.append(entry)
    response: dict[str, Any] = {"model_name": target.name, "model_version": target.version}
    if request.id is not None:
        response["id"] = request.id
    response["outputs"] = outputs
    header = json.dumps(response, allow_nan=False, separators=(",", ":")).encode()
    if not tail:
        return Encoded(header, None)
    return Encoded(header + b"".join(tail), len(header))
