"""Any ONNX CNN classifier -> a model directory (classifier.onnx, gradcam.onnx,
model.json), the same as a Keras export, with no training framework installed."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import onnx

from braincam.model_spec import (
    CLASSIFIER_ONNX,
    GRADCAM_ONNX,
    Decision,
    Explanation,
    Graphs,
    ModelSpec,
    OodDetector,
    save_spec,
)
from braincam.preprocessing import Layout, Preprocessing
from exporter import budget
from exporter.errors import ExportError
from exporter.model_dir import (
    CALIBRATION_IMAGES,
    calibration_inputs,
    data_file,
    graph_file,
    replace_dir,
    versions,
)
from exporter.onnx_grad.anatomy import GraphAnatomy
from exporter.onnx_grad.builder import BuiltGraphs, build_graphs, prepare_model
from exporter.onnx_grad.gate import run_gate
from exporter.onnx_io import check, write_with_shared_weights

log = logging.getLogger(__name__)

DEFAULT_CALIBRATION = Path("data/demo/Testing")


@dataclass
class OnnxExportResult:
    spec: ModelSpec
    out_dir: Path
    seconds: float
    anatomy: GraphAnatomy
    estimate: budget.Estimate | None = None


def load_onnx(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise ExportError(f"model file {path} does not exist")
    try:
        return onnx.load(str(path))  # external data resolves beside the file
    except Exception as exc:
        raise ExportError(f"{path} is not an ONNX model onnx can load: {exc}") from exc


def _declared_input(model: onnx.ModelProto) -> list[int | None]:
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ExportError(f"the model has {len(inputs)} inputs; one image input is supported")
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise ExportError(f"the model's input has shape {dims}; a 4-D image batch is expected")
    return dims


def _detect_layout(dims: list[int | None]) -> Layout | None:
    first, last = dims[1] in (1, 3), dims[3] in (1, 3)
    if first and not last:
        return "nchw"
    if last and not first:
        return "nhwc"
    return None


def resolve_preprocessing(model: onnx.ModelProto, options: dict[str, Any]) -> Preprocessing:
    """Layout, size and channels default to what the ONNX input declares; flags must agree."""
    dims = _declared_input(model)
    layout = options.get("layout") or _detect_layout(dims)
    if layout is None:
        raise ExportError(f"cannot tell the layout of input shape {dims}: pass --layout nchw|nhwc")
    c, h, w = (dims[1], dims[2], dims[3]) if layout == "nchw" else (dims[3], dims[1], dims[2])
    declared = {"height": h, "width": w, "channels": c}
    values: dict[str, Any] = {}
    for key, value in declared.items():
        flag = options.get(key)
        if flag is not None and value is not None and flag != value:
            raise ExportError(f"the model declares {key} {value}, not {flag}")
        values[key] = flag if flag is not None else value
    if values["height"] is None or values["width"] is None:
        raise ExportError("the model's input size is dynamic: pass --input-size H W")
    if values["channels"] is None:
        raise ExportError("the model's channel count is dynamic: pass --channels 1|3")
    for key in ("scale", "interpolation", "mean", "std"):
        if options.get(key) is not None:
            values[key] = options[key]
    try:
        return Preprocessing(layout=layout, **values)
    except ValueError as exc:
        raise ExportError(f"invalid preprocessing: {exc}") from exc


def build_for_export(
    source: onnx.ModelProto, prep: Preprocessing, layer: str | None = None,
    outputs: str = "auto", layer_layout: Layout | None = None,
) -> BuiltGraphs:
    """Both graphs from the ONNX-level builder: what both exporters call (the Keras one
    with the tensor its explained layer's output became, exporter/convert.py)."""
    return build_graphs(source, prep, layer, outputs, layer_layout)


def export_onnx_model(
    model_path: str | Path,
    out_dir: str | Path,
    *,
    labels: list[str],
    layer: str | None = None,
    height: int | None = None,
    width: int | None = None,
    channels: int | None = None,
    scale: str | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    layout: str | None = None,
    interpolation: str | None = None,
    outputs: str = "auto",
    calibration: str | Path | None = None,
    name: str | None = None,
    version: str | None = None,
    task: str | None = None,
    threshold: float | None = None,
    ood_detector: str = "mahalanobis",
    memory_limit: int = budget.DEFAULT_LIMIT,
) -> OnnxExportResult:
    """Build both graphs, gate them, and only then move the model directory into place.

    With `ood_detector` (mahalanobis or energy; none: without) the graphs also output
    `ood_score`, fitted on the `calibration` images (exporter/trust.py). No temperature
    here: the gate compares the probabilities with the source model's own.
    `memory_limit` (bytes): a model whose estimated peak exceeds it is refused before
    any image is loaded; every session runs in batches that fit (exporter/budget.py).
    """
    started = time.perf_counter()
    model_path, out_dir = Path(model_path), Path(out_dir)
    source = load_onnx(model_path)
    prep = resolve_preprocessing(source, {
        "height": height, "width": width, "channels": channels, "scale": scale,
        "interpolation": interpolation, "layout": layout,
        "mean": tuple(mean) if mean else None, "std": tuple(std) if std else None,
    })
    built = build_for_export(source, prep, layer, outputs)
    if not labels:
        raise ExportError(f"the model has {built.num_classes} classes: name them with --labels")
    if len(labels) != built.num_classes:
        raise ExportError(f"{len(labels)} labels given but the model has {built.num_classes} "
                          "classes")
    task = task or ("binary" if len(labels) == 2 else "multiclass")
    decision = Decision()
    if task == "binary":
        decision = Decision(positive_label=labels[1], threshold=0.5, threshold_method="default")
    if threshold is not None:
        decision = decision.model_copy(update={"threshold": threshold,
                                               "threshold_method": "manual"})
    calibration_dir = Path(calibration) if calibration else DEFAULT_CALIBRATION
    estimate = _estimate(source, built, prep, calibration_dir, memory_limit)
    log.info("memory: %s, limit %.2f GiB", estimate.describe(), memory_limit / budget.GiB)
    x = calibration_inputs(calibration_dir, prep)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        protos = {CLASSIFIER_ONNX: built.classifier, GRADCAM_ONNX: built.gradcam}
        ood = _add_detector(protos, built.anatomy, calibration_dir, prep, labels, ood_detector,
                            estimate.batch)
        weights = write_with_shared_weights(protos, staging)
        for filename, proto in protos.items():
            check(proto, staging / filename)
        prepared = built.info.model if built.info is not None else prepare_model(source, prep)
        report = run_gate(prepared, built.found, staging / CLASSIFIER_ONNX,
                          staging / GRADCAM_ONNX, x, batch=estimate.batch)
        if not report.passed:
            raise ExportError("gradient gate failed, nothing written:\n  "
                              + "\n  ".join(report.failures)
                              + "\nfigures: " + json.dumps(report.figures, indent=1))
        score: Literal["logit", "log_probability"] = (
            "log_probability" if built.found.kind == "probabilities" else "logit"
        )
        spec = ModelSpec(
            name=name or out_dir.name,
            version=version or "1",
            task=task,  # type: ignore[arg-type]
            labels=list(labels),
            preprocessing=prep,
            decision=decision,
            explanation=Explanation(layer=built.found.explained,
                                    activation_shape=built.activation_shape, score=score),
            graphs=Graphs(
                classifier=graph_file(staging / CLASSIFIER_ONNX, protos[CLASSIFIER_ONNX]),
                gradcam=graph_file(staging / GRADCAM_ONNX, protos[GRADCAM_ONNX]),
                weights=data_file(weights) if weights else None,
            ),
            opset=max(e.version for e in built.gradcam.opset_import if e.domain in ("", "ai.onnx")),
            parity=report.as_json(),
            versions=versions(),
            exported_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            source={
                "model": model_path.name,
                "format": "onnx",
                "output_kind": built.found.kind,
                "producer": f"{source.producer_name} {source.producer_version}".strip(),
                "logits": built.anatomy.logits,
                "pooled_features": built.anatomy.pooled_features,
            },
            ood=ood,
        )
        save_spec(spec, staging)
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return OnnxExportResult(spec, out_dir, time.perf_counter() - started, built.anatomy,
                            estimate)


def _add_detector(
    protos: dict[str, onnx.ModelProto],
    anatomy: GraphAnatomy,
    calibration_dir: Path,
    prep: Preprocessing,
    labels: list[str],
    detector: str,
    batch: int,
) -> OodDetector | None:
    """The out-of-distribution score on the penultimate features (else the energy of the
    logits), written into both graphs; None without enough calibration images."""
    from exporter import fit_data, trust

    if detector == "none":
        return None
    images = fit_data.collect({}, calibration_dir, prep, labels)
    if images is None:
        return None
    features = [anatomy.pooled_features] if anatomy.pooled_features else []
    try:
        fit = trust.fit_on_graph(protos[CLASSIFIER_ONNX], images, features=features,
                                 logits=anatomy.logits, detector=detector, calibrate=False,
                                 batch_size=batch)
    except Exception as exc:  # ORT's own errors: a graph the gate below explains (fixed batch)
        log.warning("no out-of-distribution detector: running the graph failed (%s)",
                    str(exc).splitlines()[0][:200])
        return None
    trust.apply_to_graphs(protos.values(), fit, logits=anatomy.logits,
                          probabilities=anatomy.probabilities)
    ood, _ = trust.spec_sections(fit, logits=anatomy.logits)
    return ood


def _estimate(source: onnx.ModelProto, built: BuiltGraphs, prep: Preprocessing,
              calibration_dir: Path, limit: int) -> budget.Estimate:
    """The export's peak memory from the graphs alone (exporter/budget.py): refused
    here, before any image is read or session made, if it cannot fit `limit`."""
    from exporter import fit_data
    from exporter.onnx_grad.gate import HEAD_ROWS, _head_nodes

    info = built.info
    if info is None:
        raise ExportError("the builder kept no shapes to estimate the export's memory from")
    head, _ = _head_nodes(info.model.graph, built.found)
    return budget.plan(
        weights=budget.weight_bytes(source),
        activations=budget.activation_bytes(info.model, info.shapes, info.dtypes),
        head=budget.head_bytes(info.model, head, info.shapes, HEAD_ROWS),
        prep=prep,
        images=CALIBRATION_IMAGES + fit_data.count_images(calibration_dir),
        limit=limit,
        what=source.graph.name or "the model",
    )
