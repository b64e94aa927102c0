"""Keras model -> a model directory (classifier.onnx, gradcam.onnx, model.json)."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from braincam.calibration import calibrated_threshold
from braincam.model_spec import (
    CLASSIFIER_ONNX,
    GRADCAM_ONNX,
    Decision,
    Explanation,
    Graphs,
    ModelSpec,
    save_spec,
)
from braincam.ood import MAHALANOBIS
from braincam.preprocessing import Preprocessing
from exporter import fit_data, ood_graph, trust
from exporter.errors import ExportError
from exporter.keras_layers import choose_layer
from exporter.model_dir import (
    CALIBRATION_IMAGES,
    calibration_inputs,
    data_file,
    graph_file,
    replace_dir,
    versions,
)
from exporter.onnx_export import build_for_export
from exporter.onnx_grad.builder import BuiltGraphs
from exporter.ood_fit import TrustFit

__all__ = ["CALIBRATION_IMAGES", "ExportResult", "calibration_inputs", "export_model"]

log = logging.getLogger(__name__)

RUN_JSON = "run.json"
DEFAULT_OPSET = 17
DEFAULT_CALIBRATION = Path("data/demo/Testing")
# Chosen by measurement on the demo model (trainer.ood_eval; README, "Out of distribution").
DEFAULT_DETECTOR = MAHALANOBIS
NO_DETECTOR = "none"
# The explained layer's activations averaged on a GRID x GRID grid: a graph output only
# until the trust edits consume it (ood.features in model.json names it).
GRID_FEATURES_TENSOR = "grid_features"


@dataclass
class ExportResult:
    spec: ModelSpec
    out_dir: Path
    seconds: float


def load_keras(path: Path) -> Any:
    import keras

    if not path.is_file():
        raise ExportError(f"model file {path} does not exist")
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for files it cannot read
        raise ExportError(f"{path} is not a Keras model Keras can load: {exc}") from exc


def _read_run(model_path: Path) -> dict[str, Any]:
    run = model_path.parent / RUN_JSON
    return json.loads(run.read_text()) if run.is_file() else {}


def _resolve_preprocessing(
    model: Any, run: dict[str, Any], overrides: dict[str, Any]
) -> Preprocessing:
    base = dict(run.get("preprocessing") or {})
    shape = model.input_shape
    if isinstance(shape, list):
        raise ExportError("models with several inputs are not supported")
    if shape[1] is not None:
        base.setdefault("height", int(shape[1]))
        base.setdefault("width", int(shape[2]))
    base.setdefault("channels", int(shape[3]))
    for key in ("height", "width", "channels", "scale"):
        if overrides.get(key) is not None:
            base[key] = overrides[key]
    if "height" not in base:
        raise ExportError("the model's input size is dynamic: pass --input-size H W")
    spec = Preprocessing(**base)
    if shape[3] is not None and int(shape[3]) != spec.channels:
        raise ExportError(
            f"the model takes {shape[3]} channels but preprocessing gives {spec.channels}"
        )
    if shape[1] is not None and (int(shape[1]), int(shape[2])) != (spec.height, spec.width):
        raise ExportError(
            f"the model takes {shape[1]}x{shape[2]} inputs, not {spec.height}x{spec.width}"
        )
    return spec


def _resolve_labels(run: dict[str, Any], labels: list[str] | None, k: int) -> list[str]:
    resolved = labels or run.get("labels")
    if not resolved:
        raise ExportError(f"the model has {k} classes: name them with --labels a,b,...")
    if len(resolved) != k:
        raise ExportError(f"{len(resolved)} labels given but the model has {k} classes")
    return list(resolved)


def export_model(
    model_path: str | Path,
    out_dir: str | Path,
    *,
    labels: list[str] | None = None,
    layer: str | None = None,
    height: int | None = None,
    width: int | None = None,
    channels: int | None = None,
    scale: str | None = None,
    outputs: str = "auto",
    opset: int = DEFAULT_OPSET,
    calibration: str | Path | None = None,
    name: str | None = None,
    version: str | None = None,
    task: str | None = None,
    threshold: float | None = None,
    ood_detector: str = DEFAULT_DETECTOR,
    calibrate: bool = True,
    ood_features: str = "grid",
    memory_limit: int | None = None,
) -> ExportResult:
    """Export, gate on parity, and only then move the model directory into place.

    `ood_detector` (mahalanobis, energy or none), `ood_features` (grid: the explained
    layer's activations on a 2x2 grid, or pooled: the head's first vector) and
    `calibrate` (temperature scaling when the fit images carry labels): see
    exporter/trust.py.
    """
    started = time.perf_counter()
    model_path, out_dir = Path(model_path), Path(out_dir)
    model = load_keras(model_path)
    run = _read_run(model_path)
    prep = _resolve_preprocessing(
        model, run, {"height": height, "width": width, "channels": channels, "scale": scale}
    )
    target = choose_layer(model, layer or run.get("explain_layer"), outputs)
    label_list = _resolve_labels(run, labels, target.num_classes)
    task = task or run.get("task") or ("binary" if len(label_list) == 2 else "multiclass")
    decision = Decision(**run["decision"]) if run.get("decision") else Decision(threshold=None)
    if task == "binary" and decision.positive_label is None:
        decision = Decision(positive_label=label_list[1], threshold=0.5, threshold_method="default")
    if threshold is not None:
        decision = decision.model_copy(
            update={"threshold": threshold, "threshold_method": "manual"}
        )
    calibration_dir = Path(calibration) if calibration else DEFAULT_CALIBRATION
    from exporter import budget  # refuse a model too large before any heavy work

    budget.plan_keras(model, prep, CALIBRATION_IMAGES + fit_data.count_images(calibration_dir),
                      memory_limit or budget.DEFAULT_LIMIT)
    x = calibration_inputs(calibration_dir, prep)

    from exporter.convert import check, keras_to_onnx, write_with_shared_weights
    from exporter.parity import check_parity

    # The whole model's forward pass through tf2onnx, then both graphs from the ONNX-level
    # builder (exporter/onnx_grad), explaining the tensor the Keras layer's output became.
    converted = keras_to_onnx(model, target, prep.input_shape, opset)
    built = build_for_export(converted.model, prep, converted.explained,
                             layer_layout=converted.layout)
    if tuple(built.activation_shape) != target.activation_shape:
        raise ExportError(f"layer '{target.layer_name}' has output shape "
                          f"{target.activation_shape}, but its ONNX tensor "
                          f"{converted.explained!r} {built.activation_shape}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        protos = {CLASSIFIER_ONNX: built.classifier, GRADCAM_ONNX: built.gradcam}
        fit = _add_trust(
            protos, built, run, calibration_dir, prep, label_list, ood_detector, calibrate,
            ood_features,
        )
        if fit is not None and fit.calibration_size and task == "binary":
            decision = _calibrated_decision(decision, run, fit.temperature)
        weights = write_with_shared_weights(protos, staging)
        for filename, proto in protos.items():
            check(proto, staging / filename)
        kinds = {GRID_FEATURES_TENSOR: "grid"}
        if built.anatomy.pooled_features:
            kinds[built.anatomy.pooled_features] = "pooled"
        report = check_parity(
            model, target, staging / CLASSIFIER_ONNX, staging / GRADCAM_ONNX, x, trust=fit,
            features=kinds,
        )
        if not report.passed:
            raise ExportError(
                "parity gate failed, nothing written:\n  "
                + "\n  ".join(report.failures)
                + "\nfigures: "
                + json.dumps(report.figures, indent=1)
            )
        ood, calibration_spec = (None, None)
        if fit is not None:
            ood, calibration_spec = trust.spec_sections(fit, logits=built.anatomy.logits)
        spec = ModelSpec(
            name=name or run.get("name") or out_dir.name,
            version=version or str(run.get("version", "1")),
            task=task,  # type: ignore[arg-type]
            labels=label_list,
            preprocessing=prep,
            decision=decision,
            explanation=Explanation(
                layer=target.layer_name, activation_shape=list(target.activation_shape)
            ),
            graphs=Graphs(
                classifier=graph_file(staging / CLASSIFIER_ONNX, protos[CLASSIFIER_ONNX]),
                gradcam=graph_file(staging / GRADCAM_ONNX, protos[GRADCAM_ONNX]),
                weights=data_file(weights) if weights else None,
            ),
            opset=opset,
            parity=report.as_json(),
            versions=versions(),
            exported_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            source={
                "model": model_path.name,
                "output_kind": target.output_kind,
                "trainer_run": bool(run),
                "arch": run.get("arch"),
            },
            ood=ood,
            calibration=calibration_spec,
        )
        save_spec(spec, staging)
        for extra in ("MODEL_CARD.md",):  # the card travels with the model
            if (model_path.parent / extra).is_file():
                shutil.copy2(model_path.parent / extra, staging / extra)
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(spec=spec, out_dir=out_dir, seconds=time.perf_counter() - started)


def _add_trust(
    protos: dict[str, Any],
    built: BuiltGraphs,
    run: dict[str, Any],
    calibration_dir: Path,
    prep: Preprocessing,
    labels: list[str],
    detector: str,
    calibrate: bool,
    ood_features: str = "grid",
) -> TrustFit | None:
    """Fit the detector and the temperature and edit both graphs; None: no detector."""
    images = None
    if detector != NO_DETECTOR:
        images = fit_data.collect(run, calibration_dir, prep, labels)
    if images is None:
        return None
    anatomy = built.anatomy
    candidates = [anatomy.pooled_features] if anatomy.pooled_features else []
    if built.found.tokens is None:
        for proto in protos.values():
            ood_graph.append_grid_features(
                proto, anatomy.explained, built.activation_shape,
                built.found.explained_layout == "nchw", ood_graph.GRID, GRID_FEATURES_TENSOR,
            )
        candidates.insert(0, GRID_FEATURES_TENSOR)
    run_t = (run.get("calibration") or {}).get("temperature")
    # The grid of the explained layer first (measured: it catches rotated, cropped and
    # blurred scans that the globally pooled vector lets through), else the pooled vector.
    if ood_features == "pooled":
        candidates.reverse()
    fit = trust.fit_on_graph(
        protos[CLASSIFIER_ONNX], images, features=candidates, logits=anatomy.logits,
        detector=detector, calibrate=calibrate, temperature=run_t,
    )
    trust.apply_to_graphs(protos.values(), fit, logits=anatomy.logits,
                          probabilities=anatomy.probabilities, remove=[GRID_FEATURES_TENSOR])
    log.info(
        "out-of-distribution detector %s: threshold %.4g (%d fit / %d held-out images); "
        "temperature %.4g", fit.detector, fit.threshold, fit.fit_size, fit.held_out_size,
        fit.temperature,
    )
    return fit


def _calibrated_decision(decision: Decision, run: dict[str, Any], temperature: float) -> Decision:
    """A binary threshold tuned on uncalibrated probabilities, moved to the calibrated
    scale (the same images pass). A trainer run that calibrated tuned it there already."""
    if decision.threshold is None or (run.get("calibration") or {}).get("temperature"):
        return decision
    method = f"{decision.threshold_method or 'given'}, moved to calibrated probabilities"
    return decision.model_copy(update={
        "threshold": calibrated_threshold(decision.threshold, temperature),
        "threshold_method": method,
    })
