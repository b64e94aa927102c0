"""The export's memory budget: its peak estimated before any image is loaded or any
ONNX Runtime session made, a model too large for the limit refused, and the batch
size every session runs at chosen so that the peak does not grow with the number of
calibration images.

    estimate = plan(built.info, prep, images=n, limit=4 * GiB)   # or ExportError
    run sessions in batches of estimate.batch

The peak is modelled as

    runtime + WEIGHT_COPIES x weights + images held x one image
            + batch x ACTIVATION_FACTOR x the forward's activations per image
            + the float64 head (gate.py: HEAD_ROWS rows of it, in float64)

`weights`: the initializers' bytes; `activations per image`: every float tensor the
forward pass computes, summed at batch 1 from the shapes the builder inferred (an
upper bound of one pass: ORT reuses buffers, but the Grad-CAM graph keeps the
forward's tensors for its reverse pass and adds a gradient beside most of them).
The constants are upper bounds of peaks measured with /usr/bin/time: VGG16 @240
(tf2onnx) at batches 1 and 16, and the rows of benchmarks/bench_realsize.py at the
batch they chose (docs/ARCHITECTURE.md "Real size within a budget").

The time budget (2 x one forward pass over the images used + 60 s) is not checked
here: it is a property of the code paths (each image passes the classifier a bounded
number of times), measured per architecture by the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from braincam.preprocessing import Preprocessing
from exporter.errors import ExportError

GiB = 1 << 30
MiB = 1 << 20
DEFAULT_LIMIT = 4 * GiB
# Python with numpy, onnx, ONNX Runtime and scikit-learn imported, before any model.
RUNTIME = 450 * MiB
# The source proto, its prepared copy and the arrays read from it, the built graphs,
# the weights file, the serialised copy a session is made from and the ORT session
# that runs at a time. Measured: VGG16 @240 (81 MiB of weights) peaks at 1.46 GB at
# batch 1, so these fixed terms are at least ~10 copies of its weights.
WEIGHT_COPIES = 10
# Peak per image of a batch against the sum of the forward's tensors: measured 0.23
# on VGG16 @240 (1.46 GB at batch 1, 1.90 GB at batch 16); ResNet-50, DenseNet-121,
# MobileNetV3 and EfficientNetV2-B0 at batch 16 stay under the estimate with 0.75.
ACTIVATION_FACTOR = 0.75
# The Keras path (TensorFlow, one tf2onnx conversion with the explained layer tapped, the
# ONNX builder and a GradientTape parity check) grows with the model faster than the ONNX
# path. Measured peaks through the one builder: EfficientNetV2-B0 @224 3.14 GB (23 MiB of
# weights, 62 MiB of layer outputs per image: ~1.5 GB + 21 x the latter), ResNet50 @224
# ~7.0 GB (90 MiB, 142 MiB: ~30 x). Modelled as 1.5 GB + 10 x the weights + 32 x the
# activations per image, an upper bound of both (EfficientNetV2-B0: 3.6 GiB, exported;
# ResNet50 @224: 6.9 GiB and VGG16 @240: 8.7 GiB, refused at 4 GiB).
KERAS_RUNTIME = 1536 * MiB
KERAS_WEIGHT_COPIES = 10
KERAS_ACTIVATION_FACTOR = 32.0
MAX_BATCH = 16  # more rows per run buy no speed on a CPU, only memory
FLOAT_TYPES: dict[int, int] = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2,
               onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.BFLOAT16: 2}


@dataclass
class Estimate:
    weights: int
    activations: int  # bytes per image, one forward pass
    image: int  # bytes of one preprocessed image
    images: int  # images held at once (the gate's and the detector fit's)
    head: int  # the gate's float64 head
    limit: int
    batch: int = 1
    runtime: int = RUNTIME
    copies: int = WEIGHT_COPIES
    factor: float = ACTIVATION_FACTOR

    def peak(self, batch: int | None = None) -> int:
        b = self.batch if batch is None else batch
        return int(self.runtime + self.copies * self.weights + self.images * self.image
                   + b * self.factor * self.activations + self.head)

    def describe(self, batch: int | None = None) -> str:
        b = self.batch if batch is None else batch
        return (f"~{self.peak(b) / GiB:.2f} GiB at batch {b} (weights {self.weights / MiB:.0f} "
                f"MiB x {self.copies}, activations {self.activations / MiB:.0f} MiB per image "
                f"x {self.factor:g}, {self.images} images held "
                f"{self.images * self.image / MiB:.0f} MiB, float64 head "
                f"{self.head / MiB:.0f} MiB, runtime {self.runtime / MiB:.0f} MiB)")


def weight_bytes(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(i.dims, dtype=np.int64)) * FLOAT_TYPES.get(i.data_type, 4)
               for i in model.graph.initializer)


def activation_bytes(model: onnx.ModelProto, shapes: dict[str, list[int | None]],
                     dtypes: dict[str, int]) -> int:
    """Every float tensor a node computes, at batch 1 (symbolic axes count 1)."""
    total = 0
    for node in model.graph.node:
        for out in node.output:
            dims = shapes.get(out)
            size = FLOAT_TYPES.get(dtypes.get(out, onnx.TensorProto.FLOAT), 0)
            if dims is not None and size:
                total += int(np.prod([d or 1 for d in dims], dtype=np.int64)) * size
    return total


def head_bytes(model: onnx.ModelProto, nodes: list[onnx.NodeProto],
               shapes: dict[str, list[int | None]], rows: int) -> int:
    """The float64 head: its weights twice (the float64 copy and the evaluator's) and
    `rows` rows of its tensors."""
    used = {i for n in nodes for i in n.input}
    weights = sum(int(np.prod(i.dims, dtype=np.int64)) for i in model.graph.initializer
                  if i.name in used)
    tensors = sum(int(np.prod([d or 1 for d in shapes.get(o, [])], dtype=np.int64))
                  for n in nodes for o in n.output if o in shapes)
    return 8 * (2 * weights + 2 * rows * tensors)


def plan(weights: int, activations: int, head: int, prep: Preprocessing, images: int,
         limit: int = DEFAULT_LIMIT, what: str = "the model", runtime: int = RUNTIME,
         copies: int = WEIGHT_COPIES, advice: str = "",
         factor: float = ACTIVATION_FACTOR) -> Estimate:
    """The largest batch (<= MAX_BATCH) whose estimated peak fits `limit`, or an
    ExportError naming the estimate, the limit and what to do."""
    image = 4 * int(np.prod(prep.input_shape))
    est = Estimate(weights, activations, image, images, head, limit, 1, runtime, copies, factor)
    fitting = [b for b in range(MAX_BATCH, 0, -1) if est.peak(b) <= limit]
    if not fitting:
        raise ExportError(
            f"exporting {what} needs an estimated {est.describe(1)}, over the memory limit "
            f"of {limit / GiB:.2f} GiB. Raise --memory-limit (GiB) if this machine has the "
            "memory, or export the model at a smaller input size (--input-size, if it "
            "accepts one), with fewer calibration images, or on a larger machine"
            + (f"; {advice}." if advice else "."))
    est.batch = fitting[0]
    return est


def plan_keras(model: Any, prep: Preprocessing, images: int, limit: int = DEFAULT_LIMIT
               ) -> Estimate:
    """The Keras path's estimate (KERAS_RUNTIME, KERAS_WEIGHT_COPIES); the activations
    from the layers' output shapes."""
    weights = 4 * int(model.count_params())
    activations = 0
    for layer in _layers(model):
        for out in _outputs(layer):
            shape = getattr(out, "shape", None)
            if shape is not None and len(shape) > 1:
                activations += 4 * int(np.prod([d or 1 for d in shape[1:]], dtype=np.int64))
    return plan(weights, activations, 0, prep, images, limit, f"Keras model {model.name!r}",
                runtime=KERAS_RUNTIME, copies=KERAS_WEIGHT_COPIES,
                factor=KERAS_ACTIVATION_FACTOR,
                advice="or convert it to ONNX (tf2onnx) and export the .onnx, whose path "
                "needs a fraction of the memory")


def _layers(model: Any) -> list[Any]:
    out = []
    for layer in getattr(model, "layers", []):
        out.extend(_layers(layer) if hasattr(layer, "layers") else [layer])
    return out


def _outputs(layer: Any) -> list[Any]:
    try:
        out = layer.output
    except (AttributeError, ValueError):  # a layer called more than once, or never
        return []
    return list(out) if isinstance(out, (list, tuple)) else [out]


def parse_limit(gib: float) -> int:
    """`--memory-limit` in GiB -> bytes."""
    if not gib > 0:
        raise ValueError(f"--memory-limit must be positive, got {gib}")
    return int(gib * GiB)
