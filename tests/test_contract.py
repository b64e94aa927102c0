"""The contract the three parts share: one preprocessing function, one dataset loader.

The trainer (braincam.datasets), the exporter's parity check (calibration_inputs)
and the service (decode the upload's bytes, then preprocess) must hand the model
the very same bytes for the same file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from braincam.datasets import (
    BINARY_LABELS,
    MULTICLASS_LABELS,
    DatasetError,
    load_dataset_split,
    scan_split,
)
from braincam.decoding import load_image
from braincam.model_spec import load_spec
from braincam.preprocessing import Preprocessing, preprocess, preprocess_batch


def _gradient_image(h: int, w: int, channels: int) -> np.ndarray:
    """uint8 image holding 0 and 255, with different content per channel."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.round(255 * (x + y) / (h + w - 2)).astype(np.uint8)
    if channels == 1:
        return base
    planes = [base, base[::-1], np.flipud(np.fliplr(base)), np.full_like(base, 200)]
    return np.dstack(planes[:channels])


# --- preprocessing ----------------------------------------------------------------------


@pytest.mark.parametrize("scale,low,high", [("unit", 0.0, 1.0), ("symmetric", -1.0, 1.0),
                                            ("none", 0.0, 255.0)])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("layout", ["gray", "gray1", "rgb", "rgba"])
def test_preprocess_shape_dtype_range(scale: str, low: float, high: float, channels: int,
                                      layout: str) -> None:
    src = {"gray": _gradient_image(40, 30, 1), "gray1": _gradient_image(40, 30, 1)[:, :, None],
           "rgb": _gradient_image(40, 30, 3), "rgba": _gradient_image(40, 30, 4)}[layout]
    spec = Preprocessing(height=40, width=30, channels=channels, scale=scale)  # type: ignore[arg-type]
    out = preprocess(src, spec)
    assert out.shape == (40, 30, channels) and out.dtype == np.float32
    assert out.min() >= low and out.max() <= high
    if layout.startswith("gray"):  # the gradient spans 0..255 exactly
        assert out.min() == pytest.approx(low) and out.max() == pytest.approx(high)


def test_preprocess_resizes_and_converts() -> None:
    rgb = _gradient_image(97, 131, 3)
    out = preprocess(rgb, Preprocessing(height=64, width=48, channels=1))
    assert out.shape == (64, 48, 1)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    expected = cv2.resize(gray, (48, 64), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    np.testing.assert_allclose(out[:, :, 0], expected, atol=1e-7)
    # Gray to 3 channels repeats the plane.
    three = preprocess(gray, Preprocessing(height=64, width=48, channels=3))
    assert np.array_equal(three[:, :, 0], three[:, :, 2])
    batch = preprocess_batch([rgb, gray], Preprocessing(height=64, width=48, channels=1))
    assert batch.shape == (2, 64, 48, 1)
    assert preprocess_batch([], Preprocessing(height=8, width=8)).shape == (0, 8, 8, 1)


def test_preprocess_rejects_what_decoding_never_produces() -> None:
    spec = Preprocessing(height=8, width=8)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((8, 8), np.uint16), spec)
    with pytest.raises(ValueError, match="layout"):
        preprocess(np.zeros((8, 8, 2), np.uint8), spec)


def test_preprocessing_round_trips_through_json() -> None:
    spec = Preprocessing(height=150, width=120, channels=3, scale="symmetric")
    assert Preprocessing.model_validate_json(spec.model_dump_json()) == spec
    with pytest.raises(ValueError):
        Preprocessing.model_validate({**spec.model_dump(), "unknown": 1})


def test_preprocess_mean_std_and_nchw_match_torchvision_normalize() -> None:
    # torchvision: ToTensor() (x/255, CHW) then Normalize(mean, std).
    rgb = _gradient_image(40, 30, 3)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    spec = Preprocessing(height=40, width=30, channels=3, mean=mean, std=std, layout="nchw")
    out = preprocess(rgb, spec)
    expected = (rgb.astype(np.float32) / 255 - np.asarray(mean, np.float32)) / np.asarray(
        std, np.float32
    )
    assert out.shape == spec.input_shape == (3, 40, 30) and out.flags.c_contiguous
    np.testing.assert_allclose(out, expected.transpose(2, 0, 1), rtol=1e-6, atol=1e-6)
    assert preprocess_batch([rgb, rgb], spec).shape == (2, 3, 40, 30)
    assert spec.width_axis == 3 and Preprocessing().width_axis == 2
    nhwc = preprocess(rgb, spec.model_copy(update={"layout": "nhwc"}))
    assert np.array_equal(nhwc.transpose(2, 0, 1), out)


@pytest.mark.parametrize("bad", [{"mean": (0.5,)}, {"mean": (0.5,) * 3, "std": (0.5,)},
                                 {"mean": (0.5,) * 3, "std": (0.5, 0.0, 0.5)}])
def test_preprocessing_rejects_bad_normalisation(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Preprocessing(channels=3, **bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("interpolation,flag", [("area", cv2.INTER_AREA),
                                                ("linear", cv2.INTER_LINEAR),
                                                ("cubic", cv2.INTER_CUBIC),
                                                ("nearest", cv2.INTER_NEAREST)])
def test_preprocess_interpolation_filters(interpolation: str, flag: int) -> None:
    gray = _gradient_image(97, 131, 1)
    spec = Preprocessing(height=50, width=40, interpolation=interpolation)  # type: ignore[arg-type]
    expected = cv2.resize(gray, (40, 50), interpolation=flag).astype(np.float32) / 255
    np.testing.assert_allclose(preprocess(gray, spec)[:, :, 0], expected, atol=1e-7)


def test_old_model_json_preprocessing_keeps_loading() -> None:
    # A model.json written before mean/std/layout existed: the defaults change nothing.
    old = {"height": 150, "width": 150, "channels": 1, "scale": "unit", "interpolation": "area"}
    spec = Preprocessing.model_validate(old)
    assert (spec.mean, spec.std, spec.layout) == (None, None, "nhwc")
    assert spec.input_shape == (150, 150, 1)


# --- one tensor for the trainer, the exporter and the service ---------------------------


def _write_mixed_formats(folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    files = [
        (folder / "a_gray.png", _gradient_image(97, 83, 1)),
        (folder / "b_rgb.jpg", _gradient_image(120, 100, 3)[:, :, ::-1]),  # cv2 writes BGR
        (folder / "c_gray.bmp", _gradient_image(50, 61, 1)),
        (folder / "d_rgba.png", _gradient_image(64, 64, 4)),
        (folder / "e_noisy.jpeg",
         np.random.default_rng(0).integers(0, 256, (211, 173), dtype=np.uint8)),
    ]
    for path, pixels in files:
        assert cv2.imwrite(str(path), pixels)
    return [p for p, _ in files]


def test_trainer_exporter_and_service_tensors_are_byte_identical(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from exporter.export import calibration_inputs
    from service.pipeline import prepare

    spec = load_spec(tiny_model_dir)
    files = _write_mixed_formats(tmp_path / "Testing" / "glioma")
    for cls in MULTICLASS_LABELS[1:]:  # the loader wants every class folder
        _write_mixed_formats(tmp_path / "Testing" / cls)

    trainer = load_dataset_split(tmp_path, "Testing", spec.preprocessing)
    glioma = [i for i, c in enumerate(trainer.classes) if c == "glioma"]
    assert [trainer.paths[i] for i in glioma] == files
    service = np.stack([prepare(p.read_bytes(), None, spec).batch[0] for p in files])
    exporter = calibration_inputs(tmp_path / "Testing" / "glioma", spec.preprocessing)

    assert trainer.x[glioma].tobytes() == service.tobytes()
    assert exporter.tobytes() == service.tobytes()
    assert service.shape == (len(files), *spec.preprocessing.input_shape)


# --- the Kaggle-layout loader -----------------------------------------------------------


def _kaggle(root: Path, folders: dict[str, int]) -> None:
    for name, n in folders.items():
        d = root / "Training" / name
        d.mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(d / f"{i}.jpg"), _gradient_image(32, 32, 1))


def test_loader_accepts_historic_folder_names(tmp_path: Path) -> None:
    _kaggle(tmp_path, {"Glioma_Tumor": 2, "meningioma_tumor": 1, "Pituitary": 1,
                       "no_tumor": 3, "README_files": 0})
    split = scan_split(tmp_path / "Training")
    assert split.counts() == {"glioma": 2, "meningioma": 1, "pituitary": 1, "notumor": 3}
    binary = scan_split(tmp_path / "Training", "binary")
    assert binary.labels == BINARY_LABELS
    assert binary.counts() == {"notumor": 3, "tumor": 4}
    assert set(binary.classes) == set(MULTICLASS_LABELS)  # the 4-class name is kept


def test_loader_skips_and_counts_bad_files(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    _kaggle(tmp_path, {"glioma": 2, "meningioma": 1, "pituitary": 1, "notumor": 1})
    glioma = tmp_path / "Training" / "glioma"
    (glioma / "notes.txt").write_text("not an image")
    (glioma / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    (glioma / "empty.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        loaded = load_dataset_split(tmp_path, "training", Preprocessing(height=16, width=16))
    assert len(loaded.y) == 5 and loaded.x.shape == (5, 16, 16, 1)
    reasons = {p.name: r for p, r in loaded.skipped}
    assert set(reasons) == {"notes.txt", "broken.jpg", "empty.png"}
    assert reasons["notes.txt"] == "not an image file"
    assert all(name in caplog.text for name in reasons)


@pytest.mark.parametrize("folders,message", [
    ({"glioma": 1, "meningioma": 1, "pituitary": 1}, "lacks class folders for: notumor"),
    ({"glioma": 1, "meningioma": 0, "pituitary": 1, "notumor": 1}, "holds no images"),
    ({"misc": 1}, "holds no class folders"),
])
def test_loader_rejects_unusable_layouts(tmp_path: Path, folders: dict[str, int],
                                         message: str) -> None:
    _kaggle(tmp_path, folders)
    with pytest.raises(DatasetError, match=message):
        scan_split(tmp_path / "Training")


def test_loader_needs_the_split_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset_split(tmp_path / "missing", "Training", Preprocessing(height=16, width=16))
    with pytest.raises(DatasetError, match="no 'Testing/' folder"):
        load_dataset_split(tmp_path, "Testing", Preprocessing(height=16, width=16))


def test_load_image_matches_decoding_the_bytes(tmp_path: Path) -> None:
    path = _write_mixed_formats(tmp_path / "x")[1]
    from braincam.decoding import decode_image

    assert np.array_equal(load_image(path), decode_image(path.read_bytes()).pixels)
