"""The framework-free steps of a prediction and an explanation.

The service's /predict and /explain (service/pipeline.py) and the batch CLI
(`braincam predict`) both go through these: decode + preprocess with every
decoder failure turned into an input error, and the Grad-CAM run whose gradients
are those of the class each item is explained for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from braincam.decoding import DecodedImage, OpenedImage, decode_image
from braincam.errors import InputError, UndecodableImage
from braincam.inference import GradcamOutput, OnnxModel
from braincam.model_spec import ModelSpec
from braincam.preprocessing import preprocess

log = logging.getLogger(__name__)


@contextmanager
def input_errors(what: str = "the file") -> Iterator[None]:
    """Whatever escapes a decoder on damaged bytes is the input's fault, not a crash.

    The decoders parse arbitrary bytes with third-party readers (OpenCV, pydicom,
    nibabel, zipfile) that raise all sorts of exceptions on damaged files, some of
    them lazily, after the file "opened". Those become `UndecodableImage` (a 422)
    naming `what` was read; logged in full in case it is a bug of ours.
    """
    try:
        yield
    except InputError:
        raise
    except Exception as exc:
        log.warning("decoding failed with %s", type(exc).__name__, exc_info=True)
        raise UndecodableImage(
            f"could not decode {what}: {type(exc).__name__} while reading it"
        ) from exc


@dataclass
class Prepared:
    """One image, decoded and preprocessed: what a batch needs from each input."""

    decoded: DecodedImage
    batch: np.ndarray  # [1, *spec.input_shape] float32 ([1,H,W,C] or [1,C,H,W])
    decode_s: float
    preprocess_s: float


def prepare(data: bytes, slice_index: int | None, spec: ModelSpec) -> Prepared:
    """Decode + preprocess a file's bytes; every failure is an `InputError`."""
    with input_errors():
        t0 = time.perf_counter()
        decoded = decode_image(data, slice_index)
        t1 = time.perf_counter()
        batch = preprocess(decoded.pixels, spec.preprocessing)[None]
        t2 = time.perf_counter()
    return Prepared(decoded, batch, t1 - t0, t2 - t1)


def prepare_slice(opened: OpenedImage, slice_index: int | None, spec: ModelSpec) -> Prepared:
    """`prepare` for one slice of a file already parsed by `open_image`."""
    with input_errors():
        t0 = time.perf_counter()
        decoded = opened.slice(slice_index)
        t1 = time.perf_counter()
        batch = preprocess(decoded.pixels, spec.preprocessing)[None]
        t2 = time.perf_counter()
    return Prepared(decoded, batch, t1 - t0, t2 - t1)


def gradients_for(
    model: OnnxModel, batch: np.ndarray, out: GradcamOutput, targets: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int]:
    """Activations and gradients of class `targets[i]` for each item of `batch`.

    `out` is a Grad-CAM run over `batch`. Target -1 makes the graph explain argmax;
    a binary threshold can decide the other class, and a mirrored image can flip
    argmax: those items need the gradient of the wanted class, i.e. one more run
    with an explicit target. Returns (activations, gradients, graph runs in all).
    """
    redo = np.flatnonzero(out.class_index != targets)
    if not redo.size:
        return out.activations, out.gradients, 1
    again = model.gradcam(
        np.ascontiguousarray(batch[redo]), np.asarray(targets[redo], dtype=np.int64)
    )
    acts, grads = out.activations.copy(), out.gradients.copy()
    acts[redo], grads[redo] = again.activations, again.gradients
    return acts, grads, 2
