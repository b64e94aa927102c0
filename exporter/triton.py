"""An exported model directory -> a Triton Inference Server model repository.

```
python -m exporter triton --model-dir models/demo --repo triton/
```

writes one Triton model per graph, both served by the ONNX Runtime backend:

```
triton/
  demo/                      classifier.onnx: image -> probabilities
    config.pbtxt  labels.txt  model.json
    1/model.onnx/model.onnx  1/model.onnx/weights.bin
  demo-gradcam/              gradcam.onnx: image, target -> probabilities,
    config.pbtxt  model.json    class_index, activations, gradients
    1/model.onnx/model.onnx  1/model.onnx/weights.bin
```

The ONNX files are copied byte for byte (their sha256 stays the one in
model.json), so Triton serves exactly the graphs the parity gate passed. Their
weights live in ONNX external data that ONNX Runtime resolves relative to the
graph file; Triton's ONNX Runtime backend reads a version entry that is a
*directory* named model.onnx by path (`<dir>/model.onnx`), which is the layout
it documents for external data, so the weights file sits beside each graph.
Graphs with inline weights become a plain `1/model.onnx` file.

Tensor names, data types and dims in config.pbtxt come from the graphs
themselves (read with ONNX Runtime, as Triton's backend does), and the written
repository is loaded back with ONNX Runtime and run before this returns. Only
ONNX Runtime is needed: no TensorFlow, no tritonclient.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from braincam.model_spec import (
    IMAGE_INPUT,
    MODEL_JSON,
    PROBABILITIES_OUTPUT,
    TARGET_INPUT,
    GraphFile,
    ModelSpec,
    load_spec,
    sha256_file,
)

Kind = Literal["gpu", "cpu"]

TRITON_MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.pbtxt"
LABELS_FILE = "labels.txt"
GRADCAM_SUFFIX = "-gradcam"
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_QUEUE_DELAY_US = 1000

# ONNX Runtime's type strings -> Triton's model-config data types.
_TRITON_TYPES = {
    "tensor(float)": "TYPE_FP32",
    "tensor(float16)": "TYPE_FP16",
    "tensor(double)": "TYPE_FP64",
    "tensor(int64)": "TYPE_INT64",
    "tensor(int32)": "TYPE_INT32",
    "tensor(int8)": "TYPE_INT8",
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(bool)": "TYPE_BOOL",
}
_NUMPY_TYPES = {
    "TYPE_FP32": np.float32,
    "TYPE_FP16": np.float16,
    "TYPE_FP64": np.float64,
    "TYPE_INT64": np.int64,
    "TYPE_INT32": np.int32,
    "TYPE_INT8": np.int8,
    "TYPE_UINT8": np.uint8,
    "TYPE_BOOL": np.bool_,
}
# Triton model names are directory names; keep them to what URLs carry unescaped.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class TritonExportError(ValueError):
    """The model directory cannot become a Triton repository (named reason)."""


@dataclass(frozen=True)
class Tensor:
    """One graph input or output as Triton's config describes it."""

    name: str
    data_type: str  # TYPE_FP32, ...
    dims: list[int]  # without the batch dimension; -1 = variable

    @property
    def reshape(self) -> bool:
        """A tensor of shape [N] has no dims left after the batch: Triton wants
        `dims: [1]` plus an empty reshape for it."""
        return not self.dims

    @property
    def config_dims(self) -> list[int]:
        return self.dims or [1]


@dataclass(frozen=True)
class GraphIO:
    inputs: list[Tensor]
    outputs: list[Tensor]


@dataclass(frozen=True)
class TritonModel:
    name: str
    graph: str  # classifier.onnx or gradcam.onnx
    directory: Path
    io: GraphIO

    @property
    def config(self) -> Path:
        return self.directory / CONFIG_FILE


@dataclass(frozen=True)
class TritonRepository:
    root: Path
    version: int
    models: list[TritonModel]


def read_graph_io(path: Path) -> GraphIO:
    """Names, types and shapes of a graph's inputs and outputs, from ONNX Runtime.

    The first dimension must be the dynamic batch (Triton batches along it);
    every other dimension is copied, a symbolic one becoming -1.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def tensors(args: Sequence[object]) -> list[Tensor]:
        out = []
        for arg in args:
            name, kind, shape = arg.name, arg.type, list(arg.shape)  # type: ignore[attr-defined]
            if kind not in _TRITON_TYPES:
                raise TritonExportError(f"{path.name}: {name} has unsupported type {kind}")
            if not shape or isinstance(shape[0], int):
                raise TritonExportError(
                    f"{path.name}: {name} {shape} has no dynamic batch dimension to batch along"
                )
            dims = [d if isinstance(d, int) and d > 0 else -1 for d in shape[1:]]
            out.append(Tensor(name, _TRITON_TYPES[kind], dims))
        return out

    return GraphIO(tensors(session.get_inputs()), tensors(session.get_outputs()))


def _tensor_block(tensor: Tensor, indent: str, label_file: str | None = None) -> str:
    lines = [
        "{",
        f'  name: "{tensor.name}"',
        f"  data_type: {tensor.data_type}",
        f"  dims: [ {', '.join(str(d) for d in tensor.config_dims)} ]",
    ]
    if tensor.reshape:
        lines.append("  reshape: { shape: [ ] }")
    if label_file:
        lines.append(f'  label_filename: "{label_file}"')
    lines.append("}")
    return "\n".join(indent + line for line in lines)


def render_config(
    model: TritonModel,
    spec: ModelSpec,
    *,
    max_batch_size: int,
    kind: Kind,
    instances: int,
    queue_delay_us: int,
    label_file: str | None,
) -> str:
    """config.pbtxt (protobuf text format of Triton's ModelConfig) for one graph."""
    source = getattr(spec.graphs, Path(model.graph).stem)
    assert isinstance(source, GraphFile)
    inputs = ",\n".join(_tensor_block(t, "  ") for t in model.io.inputs)
    outputs = ",\n".join(
        _tensor_block(t, "  ", label_file if t.name == PROBABILITIES_OUTPUT else None)
        for t in model.io.outputs
    )
    warmup = "\n".join(
        f'    inputs {{ key: "{t.name}" value: {{ data_type: {t.data_type} '
        f"dims: [ {', '.join(str(d) for d in t.config_dims)} ] zero_data: true }} }}"
        for t in model.io.inputs
    )
    parts = [
        f"# {spec.name} v{spec.version}: {model.graph} (sha256 {source.sha256[:16]}...),",
        f"# written by `python -m exporter triton` from {MODEL_JSON}; see docs/scaling.md.",
        f'name: "{model.name}"',
        'backend: "onnxruntime"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size}",
        "version_policy: { latest: { num_versions: 1 } }",
        f"input [\n{inputs}\n]",
        f"output [\n{outputs}\n]",
        # Requests that arrive within the delay run as one batch: throughput under
        # load at the cost of at most that much latency.
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {queue_delay_us}\n}}",
        "instance_group [\n  {\n"
        f"    count: {instances}\n    kind: {'KIND_GPU' if kind == 'gpu' else 'KIND_CPU'}\n"
        "  }\n]",
    ]
    if kind == "gpu":
        # The ONNX Runtime backend's CUDA execution provider; without TensorRT it
        # runs every node.
        parts.append(
            "optimization {\n  execution_accelerators {\n"
            '    gpu_execution_accelerator: [ { name: "cuda" } ]\n  }\n}'
        )
    # One zero batch at load time: the first request pays no session/cuDNN set-up.
    parts.append(f'model_warmup [\n  {{\n    name: "zeros"\n    batch_size: 1\n{warmup}\n  }}\n]')
    return "\n".join(parts) + "\n"


def _copy_graph(model_dir: Path, graph: str, weights: str | None, version_dir: Path) -> Path:
    """Place the graph where Triton looks for it; returns the file ORT should load."""
    if weights is None:
        target = version_dir / TRITON_MODEL_FILE
        shutil.copyfile(model_dir / graph, target)
        return target
    bundle = version_dir / TRITON_MODEL_FILE
    bundle.mkdir()
    shutil.copyfile(model_dir / graph, bundle / TRITON_MODEL_FILE)
    shutil.copyfile(model_dir / weights, bundle / weights)
    return bundle / TRITON_MODEL_FILE


def _default_version(spec: ModelSpec) -> int:
    return int(spec.version) if spec.version.isdigit() and int(spec.version) > 0 else 1


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise TritonExportError(
            f"{name!r} is not usable as a Triton model name "
            "(letters, digits, '_', '.', '-'; starting with a letter or digit)"
        )
    return name


def graph_file(version_dir: Path) -> Path:
    """The ONNX file Triton loads from a version directory (either layout)."""
    entry = version_dir / TRITON_MODEL_FILE
    return entry / TRITON_MODEL_FILE if entry.is_dir() else entry


def write_repository(
    model_dir: str | Path,
    repo: str | Path,
    *,
    name: str | None = None,
    version: int | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    kind: Kind = "gpu",
    instances: int = 1,
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    overwrite: bool = False,
) -> TritonRepository:
    """Write (or add to) a Triton model repository; see the module docstring.

    Other models already in `repo` are left alone; this model's two entries are
    replaced only with `overwrite`.
    """
    model_dir, repo = Path(model_dir), Path(repo)
    if max_batch_size < 1:
        raise TritonExportError("max_batch_size must be >= 1 (both graphs batch along N)")
    if instances < 1 or queue_delay_us < 0:
        raise TritonExportError("instances must be >= 1 and the queue delay >= 0")
    spec = load_spec(model_dir)  # verifies each file against its recorded sha256
    base = _check_name(name or spec.name)
    version = _default_version(spec) if version is None else version
    if version < 1:
        raise TritonExportError("Triton model versions are positive integers")
    weights = spec.graphs.weights.file if spec.graphs.weights else None

    plan = [(base, spec.graphs.classifier.file)]
    if spec.graphs.gradcam is not None:  # a model without a Grad-CAM graph: the classifier
        plan.append((_check_name(base + GRADCAM_SUFFIX), spec.graphs.gradcam.file))
    for model_name, _ in plan:
        existing = repo / model_name
        if existing.exists():
            if not overwrite:
                raise TritonExportError(
                    f"{existing} exists (pass overwrite / --overwrite to replace it)"
                )
            shutil.rmtree(existing)

    settings = {
        "max_batch_size": max_batch_size,
        "kind": kind,
        "instances": instances,
        "queue_delay_us": queue_delay_us,
    }
    try:
        models = [
            _write_model(model_dir, repo / model_name, graph, weights, version, spec, settings)
            for model_name, graph in plan
        ]
        result = TritonRepository(repo, version, models)
        verify_repository(result, spec, model_dir)
    except BaseException:
        # Never leave half a model behind: Triton would try to load it.
        for model_name, _ in plan:
            shutil.rmtree(repo / model_name, ignore_errors=True)
        raise
    return result


def _write_model(
    model_dir: Path,
    directory: Path,
    graph: str,
    weights: str | None,
    version: int,
    spec: ModelSpec,
    settings: dict[str, Any],
) -> TritonModel:
    version_dir = directory / str(version)
    version_dir.mkdir(parents=True)
    onnx_file = _copy_graph(model_dir, graph, weights, version_dir)
    model = TritonModel(directory.name, graph, directory, read_graph_io(onnx_file))
    _check_contract(model, spec)
    label_file = LABELS_FILE if graph == spec.graphs.classifier.file else None
    if label_file:
        # Triton's classification extension reads class names from here.
        (directory / label_file).write_text("\n".join(spec.labels) + "\n")
    # model.json travels along: labels, preprocessing and the decision threshold
    # are what a client needs to use the probabilities.
    shutil.copyfile(model_dir / MODEL_JSON, directory / MODEL_JSON)
    model.config.write_text(render_config(model, spec, label_file=label_file, **settings))
    return model


def _check_contract(model: TritonModel, spec: ModelSpec) -> None:
    """The graph must take the image the contract describes (model.json)."""
    dims = list(spec.input_shape)  # [H, W, C] or [C, H, W] (preprocessing.layout)
    image = next((t for t in model.io.inputs if t.name == IMAGE_INPUT), None)
    if image is None or image.dims != dims or image.data_type != "TYPE_FP32":
        raise TritonExportError(
            f"{model.graph}: expected input {IMAGE_INPUT!r} FP32 [N, {', '.join(map(str, dims))}], "
            f"found {[(t.name, t.data_type, t.dims) for t in model.io.inputs]}"
        )


def verify_repository(repo: TritonRepository, spec: ModelSpec, model_dir: Path) -> None:
    """Load each written graph with ONNX Runtime from its Triton path (so external
    data must resolve there), run a batch of two, and require the outputs of the
    source model directory's graph, exactly: same bytes, same results."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    for model in repo.models:
        written = graph_file(model.directory / str(repo.version))
        if sha256_file(written) != getattr(spec.graphs, Path(model.graph).stem).sha256:
            raise TritonExportError(f"{written} differs from {model.graph}")
        feeds: dict[str, np.ndarray] = {}
        for tensor in model.io.inputs:
            shape = [2, *(d if d > 0 else 1 for d in tensor.dims)]
            dtype = _NUMPY_TYPES[tensor.data_type]
            if tensor.name == TARGET_INPUT:
                feeds[tensor.name] = np.array([-1, len(spec.labels) - 1], dtype=dtype)
            else:
                feeds[tensor.name] = rng.random(shape).astype(dtype)
        providers = ["CPUExecutionProvider"]
        got = ort.InferenceSession(str(written), providers=providers).run(None, feeds)
        want = ort.InferenceSession(str(model_dir / model.graph), providers=providers).run(
            None, feeds
        )
        for tensor, a, b in zip(model.io.outputs, got, want, strict=True):
            if not np.array_equal(np.asarray(a), np.asarray(b)):
                raise TritonExportError(f"{model.name}: output {tensor.name} differs")


# --- command line ---------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m exporter triton",
        description="Write a Triton Inference Server model repository (ONNX Runtime "
        "backend) for both graphs of an exported model directory. Needs no TensorFlow.",
    )
    p.add_argument("--model-dir", required=True, type=Path, help="an exported model directory")
    p.add_argument("--repo", required=True, type=Path, help="model repository to write into")
    p.add_argument(
        "--name",
        help=f"Triton model name (default: model.json's name); the Grad-CAM graph "
        f"gets NAME{GRADCAM_SUFFIX}",
    )
    p.add_argument("--version", type=int, help="version directory (default: model.json's)")
    p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE)
    p.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=DEFAULT_QUEUE_DELAY_US,
        help="how long dynamic batching may hold a request to fill a batch",
    )
    p.add_argument("--kind", choices=("gpu", "cpu"), default="gpu", help="instance kind")
    p.add_argument("--instances", type=int, default=1, help="model instances per device")
    p.add_argument("--overwrite", action="store_true", help="replace this model's entries")
    return p.parse_args(list(argv))


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    try:
        repo = write_repository(
            args.model_dir,
            args.repo,
            name=args.name,
            version=args.version,
            max_batch_size=args.max_batch_size,
            kind=args.kind,
            instances=args.instances,
            queue_delay_us=args.max_queue_delay_us,
            overwrite=args.overwrite,
        )
    except (TritonExportError, FileNotFoundError, ValueError) as exc:
        print(f"triton export failed: {exc}", file=sys.stderr)
        return 1
    print(f"wrote Triton model repository {repo.root} (version {repo.version})")
    for model in repo.models:
        io = ", ".join(f"{t.name}{[-1, *t.dims]}" for t in model.io.inputs)
        out = ", ".join(f"{t.name}{[-1, *t.dims]}" for t in model.io.outputs)
        print(f"  {model.name}: {model.graph}  {io} -> {out}")
    print("  verified: each graph loads from its Triton path and matches the source exactly")
    print(f"  serve: tritonserver --model-repository={repo.root.resolve()}")
    return 0
