"""INT8 for CPU servers: static QDQ quantisation of classifier.onnx, gated on agreement.

    python -m exporter quantize --model-dir models/demo --calibration data/demo/Testing

ONNX Runtime's own tools (`onnxruntime.quantization.quantize_static`) calibrate the
activation ranges on real images, decoded and preprocessed by the one function the
service uses. The INT8 classifier must then decide as the float one does on those
images (top-1 agreement >= `min_agreement`, 99 % by default) or nothing is written.

Only the classifier (/predict, OIP `NAME`) is quantised. gradcam.onnx stays float32:
/explain's map is built from its gradients, which the exporter holds to Keras's within
~1e-5 relative error, and INT8 activations change them by far more than that (the
forward pass's rounding reaches every gradient through the backward pass). The
shared weights file then serves gradcam.onnx alone; the INT8 classifier holds its own.

TensorFlow is never imported: ONNX Runtime's quantisation tools need only the `onnx`
package beside it (`pip install onnx` on a serving install; the `train` extra has it).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from braincam.decision import decide
from braincam.model_spec import (
    IMAGE_INPUT,
    PROBABILITIES_OUTPUT,
    ModelSpec,
    Quantization,
    load_spec,
    save_spec,
)
from exporter.errors import ExportError
from exporter.model_dir import calibration_inputs, graph_file, replace_dir

log = logging.getLogger(__name__)

MIN_AGREEMENT = 0.99
# More than the parity gate's 32: the activation ranges come from these images, and
# 99 % agreement on 32 images would mean no disagreement at all.
QUANT_CALIBRATION_IMAGES = 256
# ORT's calibrator keeps every tensor of the graph for every calibration image until
# it computes the ranges: memory is images x activations (~0.2 GB per image for
# Xception at 299x299), so `limit` bounds it. (Its CalibMaxIntermediateOutputs
# option drops what it buffered without folding it into the ranges in ORT 1.32.)
CALIBRATION_BATCH = 8
GATE_BATCH = 16
GRADCAM_NOTE = (
    "float32: Grad-CAM is built from the graph's gradients, held to Keras's within "
    "~1e-5 by the parity gate; INT8 forward activations would move them far more"
)


class QuantizationError(Exception):
    """Quantisation failed or the INT8 classifier failed its gate: nothing was written."""


@dataclass
class QuantizeResult:
    spec: ModelSpec
    out_dir: Path
    seconds: float


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over preprocessed images."""

    def __init__(self, x: np.ndarray, batch: int = CALIBRATION_BATCH) -> None:
        self._batches: Iterator[np.ndarray] = (
            np.ascontiguousarray(x[i : i + batch]) for i in range(0, len(x), batch)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {IMAGE_INPUT: batch}


def _probabilities(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate(
        [
            session.run([PROBABILITIES_OUTPUT], {IMAGE_INPUT: x[i : i + GATE_BATCH]})[0]
            for i in range(0, len(x), GATE_BATCH)
        ]
    )


def _ood_agreement(spec: ModelSpec, float_path: Path, int8_path: Path, x: np.ndarray
                   ) -> float | None:
    """Share of images the OOD gate flags alike in both graphs; None without a gate."""
    if spec.ood is None:
        return None
    import onnxruntime as ort

    def flags(path: Path) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = spec.ood.output  # type: ignore[union-attr]
        scores = np.concatenate([
            session.run([name], {IMAGE_INPUT: x[i : i + GATE_BATCH]})[0]
            for i in range(0, len(x), GATE_BATCH)
        ])
        return np.asarray(scores).reshape(-1) > spec.ood.threshold  # type: ignore[union-attr]

    return float(np.mean(flags(float_path) == flags(int8_path)))


def quantize_classifier(
    source: Path,
    target: Path,
    x: np.ndarray,
    *,
    per_channel: bool = True,
    reduce_range: bool = False,
    activations: str = "QInt8",
    op_types: list[str] | None = None,
) -> None:
    """float classifier.onnx (its external weights beside it) -> INT8 QDQ at `target`.

    `op_types`: only these operators get INT8 kernels (None: every one ORT can).
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="braincam-quant-") as tmp:
        # Shape inference + graph optimisation first, as ORT recommends: the
        # quantiser then sees fused Conv+BN and knows every tensor's shape.
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=False)
        quantize_static(
            str(prepared),
            str(target),
            _Reader(x),  # duck-typed CalibrationDataReader
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=getattr(QuantType, activations),
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=op_types,
        )


def quantize_model_dir(
    model_dir: str | Path,
    calibration: str | Path,
    *,
    out_dir: str | Path | None = None,
    limit: int = QUANT_CALIBRATION_IMAGES,
    min_agreement: float = MIN_AGREEMENT,
    per_channel: bool = True,
    reduce_range: bool = False,
    activations: str = "QInt8",
) -> QuantizeResult:
    """Quantise an exported model directory's classifier; write it (default: in place)
    only when it passes the agreement gate. The directory is swapped in whole."""
    started = time.perf_counter()
    model_dir = Path(model_dir)
    out = Path(out_dir) if out_dir is not None else model_dir
    spec = load_spec(model_dir)
    if spec.quantization is not None:
        raise QuantizationError(
            f"{model_dir} is already quantised ({spec.quantization.classifier}); "
            "quantise the float export"
        )
    x = calibration_inputs(Path(calibration), spec.preprocessing, limit=limit)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shutil.copytree(model_dir, staging, dirs_exist_ok=True)
        float_path = model_dir / spec.graphs.classifier.file
        int8_path = staging / spec.graphs.classifier.file
        int8_path.unlink()
        try:
            quantize_classifier(
                float_path,
                int8_path,
                x,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activations=activations,
            )
        except Exception as exc:  # ORT's tools raise many types on graphs they reject
            raise QuantizationError(f"onnxruntime.quantization failed: {exc}") from exc
        reference = _probabilities(float_path, x)
        quantised = _probabilities(int8_path, x)
        agree = np.mean(
            [
                decide(a, spec).class_index == decide(b, spec).class_index
                for a, b in zip(reference, quantised, strict=True)
            ]
        )
        max_diff = float(np.abs(reference - quantised).max())
        if agree < min_agreement:
            raise QuantizationError(
                f"INT8 gate failed, nothing written: top-1 agreement {agree:.2%} < "
                f"{min_agreement:.0%} on {len(x)} calibration images "
                f"(max probability difference {max_diff:.3f})"
            )
        ood_agree = _ood_agreement(spec, float_path, int8_path, x)
        if ood_agree is not None and ood_agree < min_agreement:
            # The detector's statistics live in the classifier graph too, and INT8
            # features move its score (measured: 9 % of flags flipped on the demo).
            raise QuantizationError(
                f"INT8 gate failed, nothing written: the out-of-distribution flag agrees "
                f"with the float model's on {ood_agree:.2%} < {min_agreement:.0%} of "
                f"{len(x)} calibration images"
            )
        quantization = Quantization(
            method="static QDQ, onnxruntime.quantization.quantize_static",
            activations=activations,
            weights="QInt8",
            per_channel=per_channel,
            reduce_range=reduce_range,
            calibration_method="MinMax",
            calibration_images=len(x),
            top1_agreement=round(float(agree), 6),
            max_probability_diff=round(max_diff, 6),
            min_top1_agreement=min_agreement,
            ood_flag_agreement=None if ood_agree is None else round(ood_agree, 6),
            gradcam=GRADCAM_NOTE,
            float_classifier_sha256=spec.graphs.classifier.sha256,
        )
        import onnx

        proto = onnx.load(str(int8_path), load_external_data=False)
        graphs = spec.graphs.model_copy(update={"classifier": graph_file(int8_path, proto)})
        new_spec = spec.model_copy(update={"graphs": graphs, "quantization": quantization})
        ModelSpec.model_validate(new_spec.model_dump())  # still a valid model.json
        save_spec(new_spec, staging)
        load_spec(staging)  # every file where model.json says, with its sha256
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return QuantizeResult(new_spec, out, time.perf_counter() - started)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", required=True, type=Path,
                   help="real images (class folders or flat): the ranges and the gate")
    p.add_argument("--limit", type=int, default=QUANT_CALIBRATION_IMAGES,
                   help=f"calibration images at most (default {QUANT_CALIBRATION_IMAGES})")
    p.add_argument("--min-agreement", type=float, default=MIN_AGREEMENT,
                   help="the gate: top-1 agreement with the float model (default 0.99)")
    p.add_argument("--reduce-range", action="store_true",
                   help="7-bit weights: for CPUs without VNNI, where U8S8 can saturate")
    p.add_argument("--activations", choices=("QInt8", "QUInt8"), default="QInt8")
    p.add_argument("--no-per-channel", action="store_true",
                   help="one weight scale per tensor instead of per output channel")


def report(result: QuantizeResult) -> str:
    q = result.spec.quantization
    assert q is not None
    c = result.spec.graphs.classifier
    return (
        f"quantised {result.spec.name} v{result.spec.version} in {result.out_dir} "
        f"in {result.seconds:.1f} s\n"
        f"  {c.file}: INT8 QDQ ({q.activations} activations, per-channel "
        f"{q.per_channel}, reduce_range {q.reduce_range}), {c.size_bytes / 2**20:.2f} MiB\n"
        f"  gate on {q.calibration_images} images: top-1 agreement {q.top1_agreement:.2%} "
        f"(>= {q.min_top1_agreement:.0%}), max probability difference "
        f"{q.max_probability_diff:.4f}\n"
        f"  gradcam.onnx: {q.gradcam}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m exporter quantize",
        description="Quantise an exported model directory's classifier to INT8 (static "
        "QDQ, ONNX Runtime), gated on top-1 agreement with the float model.",
    )
    p.add_argument("--model-dir", required=True, type=Path, help="an exported model directory")
    p.add_argument("--out", type=Path, help="write here instead of in place")
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        result = quantize_model_dir(
            args.model_dir,
            args.calibration,
            out_dir=args.out,
            limit=args.limit,
            min_agreement=args.min_agreement,
            per_channel=not args.no_per_channel,
            reduce_range=args.reduce_range,
            activations=args.activations,
        )
    except (QuantizationError, ExportError, FileNotFoundError, ValueError) as exc:
        print(f"quantisation failed: {exc}", file=sys.stderr)
        return 1
    print(report(result))
    return 0
