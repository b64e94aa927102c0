"""Writing and checking ONNX graphs: the part of export both exporters share (no TensorFlow)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper
from onnx.external_data_helper import set_external_data

from exporter.errors import ExportError


def check(model: onnx.ModelProto, path: Path) -> None:
    """Structural validity: tf2onnx can emit unconverted ops silently.

    Checked from the file so that external weights are resolved too."""
    what = path.name
    foreign = sorted({n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise ExportError(
            f"{what}: unconverted TensorFlow ops left in the graph: {', '.join(foreign)}"
        )
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{what}: onnx.checker rejected the graph: {exc}") from exc


WEIGHTS_FILE = "weights.bin"
_MIN_EXTERNAL_BYTES = 1024  # small constants stay inline; they are not worth an indirection
_ALIGN = 64


def write_with_shared_weights(protos: dict[str, onnx.ModelProto], out_dir: Path) -> Path | None:
    """Write the graphs so that identical initializers are stored once, in weights.bin.

    Both graphs carry the same network weights (the Grad-CAM graph is a superset),
    so a model directory would otherwise hold every weight twice. Each initializer
    becomes an external-data reference (offset, length) into one shared file that
    ONNX Runtime resolves relative to the graph's own path.
    """
    offsets: dict[bytes, tuple[int, int]] = {}
    weights = out_dir / WEIGHTS_FILE
    with weights.open("wb") as fh:
        for proto in protos.values():
            for tensor in proto.graph.initializer:
                array = numpy_helper.to_array(tensor)
                raw = array.tobytes()
                if len(raw) < _MIN_EXTERNAL_BYTES:
                    continue
                key = hashlib.sha256(raw).digest() + bytes([tensor.data_type])
                if key not in offsets:
                    fh.write(b"\0" * (-fh.tell() % _ALIGN))
                    offsets[key] = (fh.tell(), len(raw))
                    fh.write(raw)
                offset, length = offsets[key]
                for field in ("float_data", "int32_data", "int64_data", "double_data"):
                    tensor.ClearField(field)
                tensor.raw_data = raw  # set_external_data insists on raw_data being present
                set_external_data(tensor, WEIGHTS_FILE, offset, length)
                tensor.data_location = TensorProto.EXTERNAL
                tensor.ClearField("raw_data")
    for filename, proto in protos.items():
        (out_dir / filename).write_bytes(proto.SerializeToString())
    if not offsets:
        weights.unlink()
        return None
    return weights
