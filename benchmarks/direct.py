"""In-process figures without HTTP: decoding, ONNX Runtime sessions, Grad-CAM in numpy."""

from __future__ import annotations

from functools import partial

import numpy as np

from benchmarks.stats import Timing, time_calls
from braincam.cam import compute_cam
from braincam.decoding import decode_image
from braincam.inference import OnnxModel
from braincam.occlusion import OcclusionSensitivity
from braincam.preprocessing import preprocess

BATCHES = (1, 16)


def ort_gradcam_map(model: OnnxModel, x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The ORT explanation path: one gradcam.onnx run, then Grad-CAM in numpy."""
    out = model.gradcam(x)
    return compute_cam("gradcam", out.activations, out.gradients, size=size)


def ort_occlusion_map(model: OnnxModel, x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The classifier-only explanation path: occlusion sensitivity, 32 windows a run."""
    probs = model.predict(x)
    targets = probs.argmax(axis=1)
    method = OcclusionSensitivity()
    drops = method.drops(model.predict, x, targets, base=probs[np.arange(len(x)), targets])
    return method.maps(drops, size)


def measure(model: OnnxModel, data: bytes, repeats: int, max_seconds: float) -> dict[str, Timing]:
    """Rows keyed `what@batch` (batch 1 and 16 of the same preprocessed image)."""
    decoded = decode_image(data)
    x1 = preprocess(decoded.pixels, model.spec.preprocessing)[None]
    rows = {
        "decode@1": time_calls(lambda: decode_image(data), repeats, max_seconds),
        "decode+preprocess@1": time_calls(
            lambda: preprocess(decode_image(data).pixels, model.spec.preprocessing),
            repeats,
            max_seconds,
        ),
    }
    for n in BATCHES:
        x = np.ascontiguousarray(np.repeat(x1, n, axis=0))
        rows[f"ort_classifier@{n}"] = time_calls(partial(model.predict, x), repeats, max_seconds)
        if model.has_gradcam:
            rows[f"ort_gradcam@{n}"] = time_calls(
                partial(ort_gradcam_map, model, x, decoded.size), repeats, max_seconds
            )
    # One image's occlusion map costs one classifier run per 32 windows (256 at 150x150).
    # Seconds a call: one warm-up, then at least 3 timed calls (more if the budget allows).
    rows["ort_occlusion@1"] = time_calls(
        partial(ort_occlusion_map, model, x1, decoded.size), repeats, max_seconds, warmup=1
    )
    return rows
