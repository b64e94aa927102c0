"""The numerical gate of the ONNX path, with no training framework.

- gradcam.onnx's and classifier.onnx's probabilities against the source model's (ORT).
- gradcam.onnx's gradients against central finite differences of the class score,
  computed in float64 on a float64 copy of the head (explained tensor -> score) run by
  onnx.reference: for a few random directions v per input, <G, v> must equal
  (f(a + t v) - f(a - t v)) / 2t. Directions are zero where the activation is exactly
  0: after a ReLU those are ties (max pooling over zeros, ReLU at 0) where a function
  has no derivative and the rules follow PyTorch's convention instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from braincam.model_spec import (
    ACTIVATIONS_OUTPUT,
    CLASS_OUTPUT,
    GRADIENTS_OUTPUT,
    IMAGE_INPUT,
    PROBABILITIES_OUTPUT,
    TARGET_INPUT,
)
from exporter.errors import ExportError
from exporter.onnx_grad.anatomy import Found
from exporter.onnx_grad.graph import session_in_place
from exporter.onnx_grad.probe import image_valued
from exporter.onnx_grad.reference_ops import FLOAT64_OPS

MIN_INPUTS = 16
DIRECTIONS = 3
GRADIENT_TOLERANCE = 1e-3  # |<G,v> - FD| / sum|G v|: float32 gradients vs a float64 FD
PROBABILITY_TOLERANCE = 1e-5
HEAD_ROWS = 8  # rows per float64 head evaluation
# classifier.onnx is gradcam.onnx's forward pruned (same nodes, same weights): its
# probabilities are checked against the source's on the first rows only. Measured on
# MobileNetV3-Small and VGG16 @240: the largest difference over 4, 8, 16 and 24 images
# is the same to 1e-8, three orders of magnitude under PROBABILITY_TOLERANCE; every
# image still passes gradcam.onnx, whose probabilities are checked on all of them.
CLASSIFIER_ROWS = 8


@dataclass
class GateReport:
    figures: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_json(self) -> dict[str, Any]:
        return {**self.figures, "passed": self.passed}


def _session(model: onnx.ModelProto | Path) -> Any:
    import onnxruntime as ort

    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def source_probabilities(scores: np.ndarray, kind: str) -> np.ndarray:
    """The source model's output as the contract's K-way probabilities."""
    s = scores.astype(np.float64)
    if kind == "sigmoid":
        p = 1.0 / (1.0 + np.exp(-s[:, 0]))
        return np.stack([1.0 - p, p], axis=1)
    if kind in ("softmax", "probabilities"):
        return s
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph computing in float64 (initializers, constants, casts, I/O)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    for i, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT:
            array = numpy_helper.to_array(init).astype(np.float64)
            graph.initializer[i].CopyFrom(numpy_helper.from_array(array, init.name))
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(
                    numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.DOUBLE
    return model


def _head(source: onnx.ModelProto, found: Found) -> tuple[Any, list[str]]:
    """A float64 reference evaluator of explained -> score, made of the nodes between
    them only, and the other tensors it reads (see `_head_nodes`)."""
    from onnx.reference import ReferenceEvaluator

    nodes, inputs = _head_nodes(source.graph, found)
    used = {i for node in nodes for i in node.input}
    graph = onnx.helper.make_graph(
        nodes, "head",
        [onnx.helper.make_empty_tensor_value_info(i) for i in [found.explained, *inputs]],
        [onnx.helper.make_empty_tensor_value_info(found.score_tensor)],
        [i for i in source.graph.initializer if i.name in used],
    )
    head = onnx.helper.make_model(graph, opset_imports=list(source.opset_import),
                                  ir_version=source.ir_version)
    return ReferenceEvaluator(to_float64(head), new_ops=FLOAT64_OPS), inputs


def _head_nodes(graph: onnx.GraphProto, found: Found) -> tuple[list[onnx.NodeProto], list[str]]:
    """The nodes from the explained tensor to the score, and the image-dependent tensors
    they read besides it: paths that bypass it (the residual stream around a
    transformer's token LayerNorm, a --layer inside a residual block), fed with the
    source model's values and so held fixed, as the backward pass holds them; the
    image where only shapes are read from it. The head holds no backbone: its float64
    run costs a block, not the model."""
    valued = image_valued(graph, found.image)
    from_explained = image_valued(graph, found.explained)
    producer = {o: n for n in graph.node for o in n.output if o}
    inputs: set[str] = set()
    needed: set[int] = set()
    seen: set[str] = set()
    stack = [found.score_tensor]
    while stack:
        name = stack.pop()
        if name in seen or name == found.explained:
            continue
        seen.add(name)
        if name in valued and name not in from_explained:
            inputs.add(name)
        elif name in producer:
            needed.add(id(producer[name]))
            stack.extend(i for i in producer[name].input if i)
    return [n for n in graph.node if id(n) in needed], sorted(inputs)


def _batched(session: Any, outputs: list[str], feeds: Any, x: np.ndarray, batch: int
             ) -> list[np.ndarray]:
    """`outputs` of a session over x, `batch` rows per run, concatenated."""
    parts = [session.run(outputs, feeds(x[i:i + batch])) for i in range(0, len(x), batch)]
    return [np.concatenate([np.asarray(p[k]) for p in parts]) for k in range(len(outputs))]


def _values(source: onnx.ModelProto, names: list[str], image: str, x: np.ndarray,
            batch: int) -> dict[str, np.ndarray]:
    """Tensors of the source model on images x, `batch` rows per ONNX Runtime run."""
    wanted = list(dict.fromkeys(n for n in names if n != image))
    values = {image: x} if image in names else {}
    if wanted:
        got = _batched(session_in_place(source, wanted), wanted, lambda b: {image: b}, x, batch)
        values.update(zip(wanted, got, strict=True))
    return values


def _score(out: np.ndarray, classes: np.ndarray, kind: str) -> np.ndarray:
    """The explained score per row: the logit, or the log-probability."""
    rows = np.arange(len(classes))
    if kind == "sigmoid":  # logits [-z/2, z/2]
        return np.where(classes == 1, 0.5, -0.5) * out[:, 0]
    if kind == "probabilities":
        return np.log(out[rows, classes])
    return out[rows, classes]


def _native(found: Found, from_source: dict[str, np.ndarray], acts: np.ndarray,
            grads: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The explained tensor, its gradient and where the gate may move it, in the head's
    own layout (float64). A transformer's tokens: the full token tensor from the source
    model, the gradient on the patch tokens, which alone may move."""
    if found.tokens is None:
        to_native = (0, 3, 1, 2) if found.explained_layout == "nchw" else (0, 1, 2, 3)
        a = acts.transpose(to_native).astype(np.float64)
        return a, grads.transpose(to_native).astype(np.float64), np.ones(a.shape, bool)
    tokens = from_source[found.explained]
    total = tokens.shape[1]
    g = found.tokens.to_tokens(grads.astype(np.float64), total)
    moved = found.tokens.to_tokens(np.ones(grads.shape, bool), total)
    return tokens.astype(np.float64), g, moved


def run_gate(
    source: onnx.ModelProto,
    found: Found,
    classifier: Path,
    gradcam: Path,
    x: np.ndarray,
    seed: int = 0,
    batch: int = 16,
) -> GateReport:
    """`source` is the prepared source model (original tensor names, dynamic batch);
    `batch`: images per ONNX Runtime run (exporter/budget.py)."""
    report = GateReport()
    n = len(x)
    if n < MIN_INPUTS:
        raise ExportError(f"the gate needs >= {MIN_INPUTS} calibration images, found {n}")
    evaluator, head_inputs = _head(source, found)
    try:
        # The source's scores, the tensors the head reads besides the explained one and
        # a transformer's whole token tensor; then each graph; one session at a time,
        # `batch` images per run: memory bounded whatever the number of images.
        wanted = [found.output, *head_inputs, *([found.explained] if found.tokens else [])]
        from_source = _values(source, wanted, found.image, x, batch)
        scores = from_source[found.output]
        (probs_cls,) = _batched(_session(classifier), [PROBABILITIES_OUTPUT],
                                lambda b: {IMAGE_INPUT: b}, x[:CLASSIFIER_ROWS], batch)
        probs, classes, acts, grads = _batched(
            _session(gradcam), [PROBABILITIES_OUTPUT, CLASS_OUTPUT, ACTIVATIONS_OUTPUT,
                                GRADIENTS_OUTPUT],
            lambda b: {IMAGE_INPUT: b, TARGET_INPUT: np.full(len(b), -1, np.int64)}, x, batch)
    except Exception as exc:  # ORT's errors: often a batch size fixed inside the graph
        raise ExportError(
            f"ONNX Runtime failed on a batch of {min(n, batch)} ({type(exc).__name__}: {exc}); "
            "if the model was exported with a fixed batch size, export it with a dynamic "
            "batch axis"
        ) from exc
    if len(scores) != n or len(probs) != n or len(probs_cls) != min(n, CLASSIFIER_ROWS):
        raise ExportError(f"a batch of {n} images gave {len(scores)} rows: the model's graph "
                          "fixes the batch size; export it with a dynamic batch axis")
    expected = source_probabilities(np.asarray(scores), found.kind)
    report.figures["n_inputs"] = n
    report.figures["probabilities_max_abs_diff"] = float(np.abs(probs - expected).max())
    report.figures["classifier_max_abs_diff"] = float(
        np.abs(probs_cls - expected[:CLASSIFIER_ROWS]).max())
    for key in ("probabilities_max_abs_diff", "classifier_max_abs_diff"):
        if report.figures[key] > PROBABILITY_TOLERANCE:
            report.failures.append(f"{key} {report.figures[key]:.3g} > {PROBABILITY_TOLERANCE}")

    # Finite differences in float64, NHWC outputs back to the head's own layout.
    a, g, moved = _native(found, from_source, acts, grads)
    rel = directional_errors(evaluator, head_inputs, from_source, a, g, moved, classes,
                             found.kind, seed)
    report.figures["fd_directions"] = DIRECTIONS
    report.figures["gradient_abs_max"] = float(np.abs(g).max())
    if not np.abs(g).max() > 0:  # nothing to check, and nothing to show
        report.failures.append("the gradients are zero on every image: the class scores do "
                               f"not depend on {found.explained!r} (an untrained head?)")
    report.figures["gradient_fd_max_rel_err"] = float(rel.max())
    report.figures["gradient_fd_median_rel_err"] = float(np.median(rel))
    if rel.max() > GRADIENT_TOLERANCE:
        report.failures.append(
            f"gradients differ from float64 finite differences: max relative error "
            f"{rel.max():.3g} > {GRADIENT_TOLERANCE} ({int((rel > GRADIENT_TOLERANCE).sum())} "
            f"of {rel.size} directional derivatives)"
        )
    return report


def directional_errors(evaluator: Any, head_inputs: list[str], from_source: dict[str, np.ndarray],
                       a: np.ndarray, g: np.ndarray, moved: np.ndarray, classes: np.ndarray,
                       kind: str, seed: int = 0) -> np.ndarray:
    """|<G, v> - FD| / sum|G v| [DIRECTIONS, N] for random directions v that move only
    where `moved` and the tensor `a` (fed to the float64 head `evaluator`) is nonzero."""
    n = len(a)
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((DIRECTIONS, *a.shape)) * ((a != 0) & moved)[None]
    rms = np.sqrt(np.mean(a**2, axis=tuple(range(1, a.ndim)), keepdims=True)) + 1e-12
    step = 1e-6 * rms  # per input: small against the activations' own scale
    stacked_a = np.concatenate([a + step * vi for vi in v] + [a - step * vi for vi in v])
    feeds = {evaluator.input_names[0]: stacked_a}  # the head's first input: the explained tensor
    for name in head_inputs:
        value = np.asarray(from_source[name], np.float64)
        feeds[name] = np.concatenate([value] * (2 * DIRECTIONS))
    out = np.concatenate([  # a few rows at a time: float64 memory bounded on real models
        np.asarray(evaluator.run(None, {k: x[i:i + HEAD_ROWS] for k, x in feeds.items()})[0])
        for i in range(0, len(stacked_a), HEAD_ROWS)
    ])
    cls = np.tile(classes, 2 * DIRECTIONS)
    f = _score(np.asarray(out, np.float64), cls, kind).reshape(2, DIRECTIONS, n)
    fd = (f[0] - f[1]) / (2 * step.reshape(1, n))
    summed = tuple(range(2, v.ndim))
    dot = (g[None] * v).sum(axis=summed)
    scale = np.abs(g[None] * v).sum(axis=summed) + 1e-12
    return np.asarray(np.abs(dot - fd) / scale)


def run_attribution_gate(source: onnx.ModelProto, found: Found, layers: list[Any],
                         attribution: Path, x: np.ndarray, seed: int = 0,
                         image_rows: int = 8, batch: int = 16) -> GateReport:
    """attribution.onnx against the source model: its probabilities, and the gradients at
    each layer and at the image against float64 finite differences of the model from
    that tensor on (the image's: the whole model, on the first `image_rows` inputs);
    `batch`: images per ONNX Runtime run of the source."""
    from dataclasses import replace

    from exporter.onnx_grad.attribution import (
        IMAGE_GRADIENTS_OUTPUT,
        activations_output,
        gradients_output,
    )

    report = GateReport()
    n = len(x)
    if n < MIN_INPUTS:
        raise ExportError(f"the gate needs >= {MIN_INPUTS} calibration images, found {n}")
    session = _session(attribution)
    names = [PROBABILITIES_OUTPUT, CLASS_OUTPUT, IMAGE_GRADIENTS_OUTPUT]
    for i in range(len(layers)):
        names += [activations_output(i), gradients_output(i)]
    out = dict(zip(names, session.run(names, {IMAGE_INPUT: x,
                                               TARGET_INPUT: np.full(n, -1, np.int64)}),
                   strict=True))
    scores = _values(source, [found.output], found.image, x, batch)[found.output]
    expected = source_probabilities(np.asarray(scores), found.kind)
    diff = float(np.abs(out[PROBABILITIES_OUTPUT] - expected).max())
    report.figures["n_inputs"] = n
    report.figures["probabilities_max_abs_diff"] = diff
    if diff > PROBABILITY_TOLERANCE:
        report.failures.append(f"probabilities_max_abs_diff {diff:.3g} > {PROBABILITY_TOLERANCE}")
    classes = np.asarray(out[CLASS_OUTPUT])
    checks: list[tuple[str, Found, np.ndarray, np.ndarray]] = []
    for i, layer in enumerate(layers):
        to_native = (0, 3, 1, 2) if layer.layout == "nchw" else (0, 1, 2, 3)
        checks.append((layer.name, replace(found, explained=layer.tensor, tokens=None),
                       out[activations_output(i)].transpose(to_native),
                       out[gradients_output(i)].transpose(to_native)))
    m = min(image_rows, n)
    checks.append(("image", replace(found, explained=found.image, tokens=None), x[:m],
                   out[IMAGE_GRADIENTS_OUTPUT][:m]))
    for what, at, acts, grads in checks:
        evaluator, head_inputs = _head(source, at)
        rows = len(acts)
        from_source = _values(source, head_inputs, found.image, x[:rows], batch)
        a = np.asarray(acts, np.float64)
        g = np.asarray(grads, np.float64)
        rel = directional_errors(evaluator, head_inputs, from_source, a, g, np.ones(a.shape, bool),
                                 classes[:rows], found.kind, seed)
        report.figures[f"{what}_gradient_abs_max"] = float(np.abs(g).max())
        report.figures[f"{what}_gradient_fd_max_rel_err"] = float(rel.max())
        if not np.abs(g).max() > 0:
            report.failures.append(f"{what}: the gradients are zero on every image")
        if rel.max() > GRADIENT_TOLERANCE:
            report.failures.append(
                f"{what}: gradients differ from float64 finite differences: max relative error "
                f"{rel.max():.3g} > {GRADIENT_TOLERANCE}")
    report.figures["fd_directions"] = DIRECTIONS
    return report
