"""The model directory's files, TensorFlow-free: calibration images, graph file records,
versions, and the atomic swap of a finished directory into place."""

from __future__ import annotations

import logging
import os
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from braincam.datasets import IMAGE_SUFFIXES, canonical_class
from braincam.decoding import load_image
from braincam.errors import InputError
from braincam.model_spec import DataFile, GraphFile, sha256_file
from braincam.preprocessing import Preprocessing, preprocess
from exporter.errors import ExportError

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 32


def calibration_inputs(
    root: Path, spec: Preprocessing, limit: int = CALIBRATION_IMAGES
) -> np.ndarray:
    """Up to `limit` real images from a folder (a Kaggle split, class folders or flat),
    taken round-robin across class folders so every class is represented."""
    if not root.is_dir():
        raise ExportError(f"calibration directory {root} does not exist (pass --calibration DIR)")
    testing = [p for p in root.iterdir() if p.is_dir() and p.name.lower() == "testing"]
    if testing:
        root = testing[0]
    groups = [
        sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        for d in sorted(root.iterdir())
        if d.is_dir() and canonical_class(d.name)
    ]
    if not groups:
        groups = [sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)]
    ordered = [g[i] for i in range(max(map(len, groups), default=0)) for g in groups if i < len(g)]
    images: list[np.ndarray] = []
    for path in ordered:
        if len(images) == limit:
            break
        try:
            images.append(preprocess(load_image(path), spec))
        except (InputError, OSError, ValueError):
            log.warning("calibration: skipped unreadable %s", path)
    if not images:
        raise ExportError(f"no readable images in calibration directory {root}")
    return np.stack(images)


def versions() -> dict[str, str]:
    out = {}
    for dist in (
        "braincam",
        "tensorflow",
        "tensorflow-cpu",
        "keras",
        "tf2onnx",
        "onnx",
        "onnxruntime",
        "onnxruntime-gpu",
        "numpy",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def data_file(path: Path) -> DataFile:
    return DataFile(file=path.name, sha256=sha256_file(path), size_bytes=path.stat().st_size)


def graph_file(path: Path, model: Any) -> GraphFile:
    def dims(values: Any) -> dict[str, list[int | None]]:
        return {
            v.name: [
                d.dim_value if d.HasField("dim_value") else None
                for d in v.type.tensor_type.shape.dim
            ]
            for v in values
        }

    return GraphFile(
        file=path.name,
        sha256=sha256_file(path),
        size_bytes=path.stat().st_size,
        inputs=dims(model.graph.input),
        outputs=dims(model.graph.output),
    )


def replace_dir(staging: Path, out_dir: Path) -> None:
    """Swap the finished directory into place; an old model is removed only after."""
    os.chmod(staging, 0o755)
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out_dir)
