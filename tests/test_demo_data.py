"""The demo dataset: Kaggle layout with masks, lesions exactly where the masks are,
determinism, no class shortcut in the global statistics, and the CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from trainer import demo_data
from trainer.demo_data import CLASSES, SPLITS, build_demo_dataset, render_sample

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
COUNTS = {"Training": 6, "Testing": 3}
TUMOURS = ("glioma", "meningioma", "pituitary")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "data"
    build_demo_dataset(root, per_class=COUNTS["Training"], test_per_class=COUNTS["Testing"],
                       size=SIZE, seed=0, workers=1)
    return root


def _read(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def _image_digests(root: Path, split: str) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / split).rglob("*.png"))]


# --- layout ---------------------------------------------------------------------------


def test_layout_and_class_balance(tiny: Path) -> None:
    for split, n in COUNTS.items():
        for cls in CLASSES:
            images = sorted((tiny / split / cls).glob("*.png"))
            assert len(images) == n, (split, cls)
            for path in images:
                img = _read(path)
                assert img.shape == (SIZE, SIZE) and img.dtype == np.uint8
                lesion = _read(tiny / "masks" / split / cls / path.name)
                brain = _read(tiny / "brain_masks" / split / cls / path.name)
                for mask in (lesion, brain):
                    assert mask.shape == img.shape and mask.dtype == np.uint8
                    assert set(np.unique(mask)) <= {0, 255}
                assert brain.any()
                assert lesion.any() == (cls != "notumor"), path
    assert not list(tiny.glob(".demo_data")), "the in-progress marker must be gone"


def test_dataset_json(tiny: Path) -> None:
    meta = json.loads((tiny / "dataset.json").read_text())
    assert meta["seed"] == 0 and meta["size"] == SIZE and meta["classes"] == list(CLASSES)
    assert meta["counts"] == {s: dict.fromkeys(CLASSES, n) for s, n in COUNTS.items()}
    assert meta["total"] == 4 * sum(COUNTS.values())
    assert "mni_icbm152_t1" in meta["template"]["file"]
    assert "McGill" in meta["template"]["licence"]


# --- lesions and masks ----------------------------------------------------------------


@pytest.mark.parametrize("cls", TUMOURS)
def test_mask_coincides_with_lesion(cls: str) -> None:
    for i in range(6):
        seed = (3, 0, CLASSES.index(cls), i)
        img, lesion, _ = render_sample(seed, cls, SIZE)
        plain, no_lesion, _ = render_sample(seed, cls, SIZE, with_lesion=False)
        assert not no_lesion.any()
        diff = np.abs(img.astype(np.float64) - plain)
        inside = lesion > 0
        far = cv2.dilate(lesion, np.ones((13, 13), np.uint8)) == 0
        assert inside.sum() >= 5
        # Inside the mask the lesion changes the image; far from it almost nothing does
        # (the brain-mean renormalisation shifts every pixel a little).
        assert diff[inside].mean() > 15, (cls, i)
        assert diff[inside].mean() > 8 * diff[far].mean(), (cls, i)


@pytest.mark.parametrize("cls", TUMOURS)
def test_lesion_lies_inside_the_head(cls: str) -> None:
    for i in range(8):
        seed = (4, 1, CLASSES.index(cls), i)
        _, lesion, brain = render_sample(seed, cls, SIZE)
        _, _, brain0 = render_sample(seed, cls, SIZE, with_lesion=False)
        inside = lesion > 0
        assert not (inside & (brain == 0)).any(), "the brain mask covers the lesion"
        if cls == "glioma":  # intra-axial: within the normal brain
            region = cv2.dilate(brain0, np.ones((3, 3), np.uint8)) > 0
        else:  # meningioma/pituitary: intracranial, up to the inner skull surface
            hull = np.zeros_like(brain0)
            cv2.fillConvexPoly(hull, cv2.convexHull(cv2.findNonZero(brain0)), 255)
            region = cv2.dilate(hull, np.ones((5, 5), np.uint8)) > 0
        assert (inside & region).sum() >= 0.97 * inside.sum(), (cls, i)


def test_lesion_sites() -> None:
    """Glioma in hemispheric white matter, pituitary on the midline at the sella,
    meningioma against the inner skull surface (or the falx)."""
    for i in range(6):
        z = demo_data.Z_RANGE[0] + 9 * i
        sl = demo_data.get_slice(z)
        g = demo_data.draw_globals(np.random.default_rng(i), SIZE)
        rng = np.random.default_rng([i, 1])
        gl = demo_data.glioma(rng, sl, z)
        assert gl.push_centre is not None
        row, col = (round(v) for v in gl.push_centre)
        assert sl.wm[row, col] > 0.5 and abs(col - demo_data.MID_COL) > 10
        pit = demo_data.pituitary(rng, sl)
        assert pit.push_centre is not None
        assert abs(pit.push_centre[1] - demo_data.MID_COL) < 2
        assert abs(pit.push_centre[0] - demo_data.SELLA_ROW) < 4
        men = demo_data.meningioma(rng, sl, z, g.csf_gap)
        core = men.alpha >= 0.5
        at_skull = sl.hull_dist[core].max() >= g.csf_gap - 1.0
        on_falx = np.abs(np.nonzero(core)[1] - demo_data.MID_COL).min() <= 1
        assert at_skull or on_falx, i


def test_lesion_sizes() -> None:
    """At the default 150 px: visible but not huge; the pituitary smallest (>= ~4 px)."""
    for cls in TUMOURS:
        for i in range(8):
            _, lesion, brain = render_sample((5, 0, CLASSES.index(cls), i), cls, 150)
            radius = np.sqrt((lesion > 0).sum() / np.pi)
            cols = np.nonzero((brain > 0).any(axis=0))[0]
            width = cols[-1] - cols[0]
            if cls == "pituitary":
                assert 3.5 <= radius <= 0.12 * width, (cls, i, radius)
            else:
                assert 0.04 * width <= radius <= 0.2 * width, (cls, i, radius, width)


def test_notumor_has_no_lesion() -> None:
    for i in range(4):
        _, lesion, brain = render_sample((0, 0, 3, i), "notumor", SIZE)
        assert not lesion.any() and brain.any()


def test_lesion_free_twin(tiny: Path, tmp_path: Path) -> None:
    # notumor: the twin is the very same image; a tumour image loses its lesion only.
    meta = demo_data.read_demo_meta(tiny)
    assert meta is not None and demo_data.read_demo_meta(tmp_path) is None
    healthy = sorted((tiny / "Testing" / "notumor").glob("*.png"))[0]
    original = cv2.imread(str(healthy), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(demo_data.lesion_free_twin(meta, healthy), original)
    for cls in ("glioma", "meningioma", "pituitary"):
        path = sorted((tiny / "Training" / cls).glob("*.png"))[1]
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.float32)
        lesion = cv2.imread(str(tiny / "masks" / "Training" / cls / path.name),
                            cv2.IMREAD_UNCHANGED) > 0
        twin = demo_data.lesion_free_twin(meta, path)
        assert twin is not None and twin.shape == image.shape
        near = cv2.dilate(lesion.astype(np.uint8), np.ones((15, 15), np.uint8)) > 0
        diff = np.abs(twin.astype(np.float32) - image)
        assert diff[lesion].mean() > 3 * diff[~near].mean(), cls
        assert np.corrcoef(twin[~near].ravel(), image[~near].ravel())[0, 1] > 0.95, cls
    # Not a demo image: no twin.
    assert demo_data.lesion_free_twin(meta, tiny / "Testing" / "glioma" / "other.png") is None
    assert demo_data.lesion_free_twin(meta, tmp_path / "Testing" / "tumour" / healthy.name) is None


def test_unknown_class() -> None:
    with pytest.raises(ValueError, match="unknown class"):
        render_sample((0, 0, 0, 0), "astrocytoma", SIZE)


# --- determinism and uniqueness -------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_images(tiny: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    build_demo_dataset(again, per_class=COUNTS["Training"], test_per_class=COUNTS["Testing"],
                       size=SIZE, seed=0, workers=1)
    assert _digests(again) == _digests(tiny)
    other = tmp_path / "other"
    build_demo_dataset(other, per_class=COUNTS["Training"], test_per_class=COUNTS["Testing"],
                       size=SIZE, seed=1, workers=1)
    assert not set(_image_digests(other, "Training")) & set(_image_digests(tiny, "Training"))


def test_worker_processes_give_the_same_files(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo_data, "PARALLEL_MIN_IMAGES", 1)
    pooled = tmp_path / "pooled"
    build_demo_dataset(pooled, per_class=COUNTS["Training"], test_per_class=COUNTS["Testing"],
                       size=SIZE, seed=0, workers=2)
    assert _digests(pooled) == _digests(tiny)


def test_images_unique_and_splits_disjoint(tiny: Path) -> None:
    train, test = _image_digests(tiny, "Training"), _image_digests(tiny, "Testing")
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)


def test_rebuild_replaces_a_previous_build(tmp_path: Path) -> None:
    root = tmp_path / "d"
    build_demo_dataset(root, per_class=2, test_per_class=1, size=32)
    build_demo_dataset(root, per_class=1, test_per_class=1, size=32)
    assert len(list((root / "Training").rglob("*.png"))) == 4
    assert len(list((root / "masks" / "Training").rglob("*.png"))) == 4


def test_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a demo dataset")
    with pytest.raises(ValueError, match="not empty"):
        build_demo_dataset(tmp_path, per_class=1, test_per_class=1, size=32)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# --- no global shortcut ---------------------------------------------------------------


def test_global_statistics_do_not_reveal_the_class() -> None:
    stats: dict[str, list[tuple[float, float, float]]] = {}
    for c, cls in enumerate(CLASSES):
        rows = []
        for i in range(40):
            img, _, brain = render_sample((7, 0, c, i), cls, SIZE)
            rows.append((img.mean(), img.std(), (brain > 0).mean()))
        stats[cls] = rows
    values = np.array(list(stats.values()))  # [class, image, stat]
    per_class = values.mean(axis=1)  # [class, stat]
    between_images = values.reshape(-1, 3).std(axis=0)
    spread = per_class.max(axis=0) - per_class.min(axis=0)
    # Mean brightness, contrast and brain size: class means within a fraction of the
    # image-to-image spread (a shortcut would be a multiple of it).
    assert (spread < 0.5 * between_images).all(), (spread, between_images)


# --- CLI ------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trainer.demo_data", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_builds_a_dataset(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    proc = _cli("--out", str(out), "--per-class", "1", "--test-per-class", "1", "--size", "48")
    assert proc.returncode == 0, proc.stderr
    assert "8 images" in proc.stdout and str(out) in proc.stdout
    assert len(list(out.rglob("*.png"))) == 8 * 3
    assert json.loads((out / "dataset.json").read_text())["size"] == 48


def test_cli_rejects_bad_arguments(tmp_path: Path) -> None:
    proc = _cli("--out", str(tmp_path / "x"), "--per-class", "0")
    assert proc.returncode == 2
    assert "--per-class must be at least 1" in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--test-per-class", "-1"], "--test-per-class must be at least 1"),
        (["--size", "8"], "--size must be between"),
        (["--seed", "-3"], "--seed must be non-negative"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--per-class", "many"], "invalid int value"),
    ],
)
def test_cli_argument_checks(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        demo_data.main(["--out", str(tmp_path / "x"), *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    proc = _cli("--out", str(tmp_path), "--per-class", "1", "--test-per-class", "1")
    assert proc.returncode == 1 and "not empty" in proc.stderr


def test_api_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="per-class must be at least 1"):
        build_demo_dataset(tmp_path / "x", per_class=0)
    assert SPLITS == ("Training", "Testing")
