"""Reader for the Kaggle Brain Tumor MRI Dataset layout (and the demo dataset).

    ROOT/Training/<class>/*.jpg|png|...    ROOT/Testing/<class>/...

Class folders are matched case-insensitively with the dataset's historic
aliases (`no_tumor`, `glioma_tumor`, ...). Files that are not images, or that
fail to decode, are skipped with a warning and counted; they never crash a run.
"""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from braincam.decoding import load_image
from braincam.errors import InputError
from braincam.preprocessing import Preprocessing, preprocess

log = logging.getLogger(__name__)

MULTICLASS_LABELS = ("glioma", "meningioma", "pituitary", "notumor")
BINARY_LABELS = ("notumor", "tumor")
POSITIVE_LABEL = "tumor"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
SPLITS = ("Training", "Testing")

_ALIASES = {
    "glioma": "glioma",
    "glioma_tumor": "glioma",
    "glioma tumor": "glioma",
    "meningioma": "meningioma",
    "meningioma_tumor": "meningioma",
    "meningioma tumor": "meningioma",
    "pituitary": "pituitary",
    "pituitary_tumor": "pituitary",
    "pituitary tumor": "pituitary",
    "notumor": "notumor",
    "no_tumor": "notumor",
    "no tumor": "notumor",
    "no-tumor": "notumor",
}

Task = Literal["multiclass", "binary"]


class DatasetError(InputError):
    """The data directory cannot be used (missing, empty, a class without images)."""

    code = "bad_dataset"


def canonical_class(folder_name: str) -> str | None:
    """Folder name -> one of MULTICLASS_LABELS, or None if it is not a class folder."""
    return _ALIASES.get(folder_name.strip().lower())


def labels_for(task: Task) -> tuple[str, ...]:
    return MULTICLASS_LABELS if task == "multiclass" else BINARY_LABELS


def task_label(cls: str, task: Task) -> str:
    if task == "multiclass":
        return cls
    return "notumor" if cls == "notumor" else POSITIVE_LABEL


@dataclass
class Split:
    """The files of one split, their labels, and what was skipped and why."""

    root: Path
    labels: tuple[str, ...]
    paths: list[Path] = field(default_factory=list)
    y: list[int] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)  # 4-class name, also in binary mode
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        c = Counter(self.labels[i] for i in self.y)
        return {label: c.get(label, 0) for label in self.labels}


def find_split_dir(root: Path, split: str) -> Path:
    """`Training`/`Testing` under root, matched case-insensitively."""
    if not root.is_dir():
        raise DatasetError(f"data directory {root} does not exist")
    for child in root.iterdir():
        if child.is_dir() and child.name.lower() == split.lower():
            return child
    raise DatasetError(f"{root} has no '{split}/' folder (expected the Kaggle layout)")


def scan_split(split_dir: Path, task: Task = "multiclass") -> Split:
    """List the image files of one split; every class folder must hold images."""
    labels = labels_for(task)
    split = Split(root=split_dir, labels=labels)
    seen: dict[str, int] = {}
    for folder in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        cls = canonical_class(folder.name)
        if cls is None:
            log.warning("ignoring folder %s: not a known class", folder)
            continue
        n = 0
        for path in sorted(folder.iterdir()):
            if not path.is_file():
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                split.skipped.append((path, "not an image file"))
                continue
            split.paths.append(path)
            split.classes.append(cls)
            split.y.append(labels.index(task_label(cls, task)))
            n += 1
        if n == 0:
            raise DatasetError(f"class folder {folder} holds no images")
        seen[cls] = seen.get(cls, 0) + n
    if not split.paths:
        raise DatasetError(f"{split_dir} holds no class folders with images")
    missing = [c for c in MULTICLASS_LABELS if c not in seen]
    if task == "multiclass" and missing:
        raise DatasetError(f"{split_dir} lacks class folders for: {', '.join(missing)}")
    if task == "binary" and ("notumor" not in seen or len(seen) < 2):
        raise DatasetError(f"{split_dir} needs a notumor folder and at least one tumour folder")
    return split


@dataclass
class LoadedSplit:
    x: np.ndarray  # float32 [N, *spec.input_shape], output of `preprocess`
    y: np.ndarray  # int64 [N]
    paths: list[Path]
    classes: list[str]
    labels: tuple[str, ...]
    skipped: list[tuple[Path, str]]


def _decode_one(path: Path, spec: Preprocessing) -> np.ndarray | str:
    try:
        return preprocess(load_image(path), spec)
    except (InputError, OSError, ValueError) as exc:
        return str(exc)


def load_split(split: Split, spec: Preprocessing, workers: int = 4) -> LoadedSplit:
    """Decode and preprocess every file; unreadable ones are skipped, warned and counted."""
    with ThreadPoolExecutor(max_workers=workers) as pool:  # cv2 releases the GIL
        results = list(pool.map(lambda p: _decode_one(p, spec), split.paths))
    xs: list[np.ndarray] = []
    ys: list[int] = []
    paths: list[Path] = []
    classes: list[str] = []
    skipped = list(split.skipped)
    for path, cls, y, result in zip(split.paths, split.classes, split.y, results, strict=True):
        if isinstance(result, str):
            skipped.append((path, result))
            continue
        xs.append(result)
        ys.append(y)
        paths.append(path)
        classes.append(cls)
    for path, reason in skipped:
        log.warning("skipped %s: %s", path, reason)
    if not xs:
        raise DatasetError(f"no readable images in {split.root}")
    return LoadedSplit(
        x=np.stack(xs),
        y=np.asarray(ys, dtype=np.int64),
        paths=paths,
        classes=classes,
        labels=split.labels,
        skipped=skipped,
    )


def load_dataset_split(
    root: str | Path, split: str, spec: Preprocessing, task: Task = "multiclass"
) -> LoadedSplit:
    """Convenience: find, scan and load `root/<split>`."""
    return load_split(scan_split(find_split_dir(Path(root), split), task), spec)
