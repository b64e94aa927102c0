"""Explanation-quality metrics on synthetic CAMs, and the eval command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from braincam.decoding import load_image
from braincam.localization import (
    auc,
    baseline_image,
    causal_aucs,
    deletion_auc,
    energy_in_mask,
    insertion_auc,
    lesion_auroc,
    off_brain_mass,
    off_brain_peak,
    perturbation_batch,
    pointing_game,
    random_deletion_auc,
    random_insertion_auc,
    random_order,
    tolerance_px,
    top_fraction_iou,
)

N = 40  # image side


def lesion_mask() -> np.ndarray:
    m = np.zeros((N, N), bool)
    m[5:15, 20:30] = True  # area 100
    return m


def test_cam_equal_to_mask_scores_perfectly() -> None:
    mask = lesion_mask()
    cam = mask.astype(np.float32)
    assert pointing_game(cam, mask) == 1.0
    assert energy_in_mask(cam, mask) == 1.0
    # The top 15 % (240 px) is capped to the 100 positive pixels: exactly the lesion.
    assert top_fraction_iou(cam, mask) == 1.0
    # A region smaller than the lesion (5 % = 80 px) lies inside it: IoU = 80/100.
    assert top_fraction_iou(cam, mask, fraction=0.05) == pytest.approx(0.8)
    # A smooth CAM that is positive everywhere: the 240 highest pixels are a disc
    # around the lesion centre, so IoU = 100 / 240 exactly.
    yy, xx = np.mgrid[0:N, 0:N]
    smooth = np.exp(-((yy - 9.5) ** 2 + (xx - 24.5) ** 2) / 50.0)
    smooth[mask] += 1.0  # the lesion ranks first
    assert top_fraction_iou(smooth, mask) == pytest.approx(100 / 240)


def test_lesion_auroc_ranks_and_ignores_contrast() -> None:
    mask = lesion_mask()
    cam = mask.astype(np.float32)
    assert lesion_auroc(cam, mask) == 1.0
    assert lesion_auroc(1.0 - cam, mask) == 0.0
    assert lesion_auroc(np.full((N, N), 0.3, np.float32), mask) == 0.5  # ties count half
    # Half the lesion on top, half tied with the background at zero: 0.5 * 1 + 0.5 * 0.5.
    half = cam.copy()
    half[5:10] = 0.0
    assert lesion_auroc(half, mask) == pytest.approx(0.75)
    # Rank-based: any increasing transform leaves it unchanged, while energy-in-mask moves.
    rng = np.random.default_rng(0)
    noisy = np.clip(cam * 0.5 + rng.random((N, N)) * 0.6, 0, 1).astype(np.float32)
    assert lesion_auroc(noisy**3, mask) == pytest.approx(lesion_auroc(noisy, mask))
    assert energy_in_mask(noisy**3, mask) > energy_in_mask(noisy, mask)
    assert np.isnan(lesion_auroc(cam, np.zeros((N, N), bool)))
    assert np.isnan(lesion_auroc(cam, np.ones((N, N), bool)))


def test_cam_outside_mask_scores_zero() -> None:
    mask = lesion_mask()
    cam = np.zeros((N, N), np.float32)
    cam[30:38, 2:10] = 1.0
    assert pointing_game(cam, mask) == 0.0
    assert energy_in_mask(cam, mask) == 0.0
    assert top_fraction_iou(cam, mask) == 0.0


def test_pointing_tolerance() -> None:
    mask = lesion_mask()
    cam = np.zeros((N, N), np.float32)
    cam[10, 33] = 1.0  # 4 px right of the lesion's last column (29)
    assert pointing_game(cam, mask, tolerance=0) == 0.0
    assert pointing_game(cam, mask, tolerance=3.9) == 0.0
    assert pointing_game(cam, mask, tolerance=4.0) == 1.0
    assert tolerance_px((150, 200)) == pytest.approx(6.0)  # 4 % of the shorter side


def test_degenerate_inputs() -> None:
    mask = lesion_mask()
    zero = np.zeros((N, N), np.float32)
    assert pointing_game(zero, mask) == 0.0
    assert energy_in_mask(zero, mask) == 0.0
    assert top_fraction_iou(zero, mask) == 0.0
    assert np.isnan(off_brain_mass(zero, mask))  # points nowhere: neither pass nor fail
    assert np.isnan(off_brain_peak(zero, mask))
    empty = np.zeros((N, N), bool)
    assert np.isnan(pointing_game(mask.astype(np.float32), empty))
    assert np.isnan(energy_in_mask(mask.astype(np.float32), empty))
    with pytest.raises(ValueError):
        energy_in_mask(zero, mask[:10])


def test_off_brain_mass_half_outside() -> None:
    brain = np.zeros((N, N), bool)
    brain[:, : N // 2] = True
    cam = np.zeros((N, N), np.float32)
    cam[10:20, 10:30] = 0.7  # 10 columns inside the brain, 10 outside
    assert off_brain_mass(cam, brain) == pytest.approx(0.5)
    assert off_brain_mass(np.ones((N, N), np.float32), np.ones((N, N), bool)) == 0.0


def test_off_brain_peak_ignores_a_flat_floor() -> None:
    brain = np.zeros((N, N), bool)
    brain[:, : N // 2] = True
    cam = np.full((N, N), 0.1, np.float32)  # a floor everywhere, most of it off-brain ...
    cam[5:15, 5:15] = 1.0  # ... and the peak inside the brain
    assert off_brain_mass(cam, brain) > 0.3
    assert off_brain_peak(cam, brain) == 0.0
    cam[30:35, 30:35] = 0.8  # a second hot spot off the brain: 25 of 125 peak pixels
    assert off_brain_peak(cam, brain) == pytest.approx(25 / 125)


def test_auc_trapezoid() -> None:
    assert auc(np.ones(17)) == pytest.approx(1.0)
    assert auc(np.linspace(1, 0, 9)) == pytest.approx(0.5)
    assert auc(np.array([0.0, 1.0])) == pytest.approx(0.5)


def test_perturbation_batch_endpoints() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((N, N, 3), dtype=np.float32)
    base = baseline_image(image, "mean")
    order = random_order((N, N), seed=1)
    dele = perturbation_batch(image, order, base, steps=4, mode="deletion")
    ins = perturbation_batch(image, order, base, steps=4, mode="insertion")
    assert dele.shape == (5, N, N, 3)
    np.testing.assert_array_equal(dele[0], image)
    np.testing.assert_array_equal(dele[-1], base)
    np.testing.assert_array_equal(ins[0], base)
    np.testing.assert_array_equal(ins[-1], image)
    # half way, exactly half of the pixels are replaced
    changed = np.any(dele[2] != image, axis=2)
    assert changed.sum() == N * N // 2


def test_blur_baseline_keeps_mean_and_smooths() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((N, N, 1), dtype=np.float32)
    blurred = baseline_image(image, "blur")
    assert blurred.shape == image.shape and blurred.dtype == np.float32
    assert blurred.std() < 0.3 * image.std()
    assert abs(float(blurred.mean()) - float(image.mean())) < 0.05


class MaskFraction:
    """Toy model: p(class 1) = fraction of lesion pixels still showing the lesion value."""

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask
        self.calls = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        p = (batch[:, self.mask, 0] == 1.0).mean(axis=1)
        return np.stack([1 - p, p], axis=1)


def test_deletion_and_insertion_with_a_toy_model() -> None:
    mask = lesion_mask()
    image = mask.astype(np.float32)[:, :, None]  # lesion = 1, rest = 0; baseline zero
    model = MaskFraction(mask)
    cam = mask.astype(np.float32)
    d = deletion_auc(model, image, cam, 1, steps=16, baseline="zero")
    rd = random_deletion_auc(model, image, 1, steps=16, baseline="zero", seed=0)
    i = insertion_auc(model, image, cam, 1, steps=16, baseline="zero")
    ri = random_insertion_auc(model, image, 1, steps=16, baseline="zero", seed=0)
    # The mask CAM removes the whole lesion in the first 1/16 of the steps.
    assert d < 0.05 < 0.4 < rd
    assert i > 0.95 > 0.6 > ri
    assert rd == pytest.approx(0.5, abs=0.05) and ri == pytest.approx(0.5, abs=0.05)
    assert model.calls == 4  # one batched call per curve


def test_causal_aucs_batches_everything_in_one_call() -> None:
    mask = lesion_mask()
    image = mask.astype(np.float32)[:, :, None]
    model = MaskFraction(mask)
    inverted = 1.0 - mask.astype(np.float32)
    out = causal_aucs(
        model,
        image,
        {"good": mask.astype(np.float32), "bad": inverted},
        1,
        steps=8,
        baseline="zero",
    )
    assert model.calls == 1
    assert set(out) == {"good", "bad", "random"}
    assert out["good"]["deletion"] < out["random"]["deletion"] < out["bad"]["deletion"]
    assert out["good"]["insertion"] > out["random"]["insertion"] > out["bad"]["insertion"]
    single = deletion_auc(model, image, mask.astype(np.float32), 1, steps=8, baseline="zero")
    assert out["good"]["deletion"] == pytest.approx(single)


# --- the command, end to end --------------------------------------------------------


def test_explain_eval_end_to_end(
    demo_data: Path, tiny_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from trainer.explain_eval import GRID_PNG, REPORT_JSON, REPORT_MD, main

    out = tmp_path / "explain"
    code = main(
        [
            "--model-dir",
            str(tiny_model_dir),
            "--data",
            str(demo_data),
            "--methods",
            "gradcam,hirescam,eigencam",
            "--limit",
            "2",
            "--steps",
            "4",
            "--out",
            str(out),
            "--keras",
            str(tiny_run / "model.keras"),
        ]
    )
    assert code == 0
    report = json.loads((out / REPORT_JSON).read_text())
    assert report["n_images"] == 8  # 2 per class, 4 classes
    assert 0 < report["n_lesion_images"] <= 6  # notumor has no lesion
    assert list(report["methods"]) == ["gradcam", "hirescam", "eigencam"]
    for res in report["methods"].values():
        overall = res["overall"]
        for key in (
            "pointing_game",
            "pointing_game_strict",
            "energy_in_mask",
            "top15_iou",
            "lesion_auroc",
            "off_brain_mass",
            "off_brain_mass_tumour",
            "deletion_auc",
            "insertion_auc",
            "random_deletion_auc",
            "random_insertion_auc",
        ):
            assert 0.0 <= overall[key] <= 1.0, key
        assert overall["deletion_ratio"] is None or overall["deletion_ratio"] >= 0.0
        assert res["per_class"]["notumor"]["pointing_game"] is None  # no lesion metrics
        assert set(res["goals"]) == {
            "pointing_game",
            "energy_in_mask",
            "deletion_ratio",
            "off_brain_mass",
        }
    # Reference rows: the uniform map scores the lesion's area share (chance), the
    # lesion mask at the layer's grid is the ceiling and must beat chance.
    refs = report["references"]
    uniform, oracle = refs["uniform"]["overall"], refs["lesion_mask"]["overall"]
    shares = []
    for cls in ("glioma", "meningioma", "pituitary"):
        for mask in sorted((demo_data / "masks" / "Testing" / cls).glob("*.png"))[:2]:
            shares.append(float((np.asarray(load_image(mask)) > 127).mean()))
    assert uniform["energy_in_mask"] == pytest.approx(np.mean(shares), rel=1e-6)
    assert oracle["pointing_game"] == 1.0
    assert oracle["energy_in_mask"] > 2 * uniform["energy_in_mask"]
    assert oracle["off_brain_mass"] < uniform["off_brain_mass"]
    assert refs["lesion_mask"]["per_class"]["notumor"]["n_images"] == 0
    assert report["settings"]["layer_grid"] is not None
    # Every tumour image of the demo data has a lesion-free twin.
    twins = report["lesion_free_twins"]
    assert twins["n_images"] == report["n_lesion_images"]
    assert sum(twins["twin_predicted"].values()) == twins["n_images"]
    assert 0.0 <= twins["twin_called_healthy"] <= 1.0
    # The shuffled-weights sanity check ran on every image through a real export.
    check = report["randomization"]
    assert check["n_images"] == 8 and "error" not in check
    assert list(check["methods"]) == ["gradcam", "hirescam", "eigencam"]
    for res in check["methods"].values():
        rho = res["mean_rank_correlation"]
        assert rho is None or -1.0 <= rho <= 1.0
    md = (out / REPORT_MD).read_text()
    assert "shuffled weights" in md
    assert "| gradcam |" in md and "Goal check" in md and "ceiling" in md
    assert "without their lesions" in md
    assert (out / GRID_PNG).read_bytes().startswith(b"\x89PNG")


def test_rank_correlation() -> None:
    from trainer.sanity_check import rank_correlation

    ramp = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert rank_correlation(ramp, ramp**2) == pytest.approx(1.0)  # same order
    assert rank_correlation(ramp, -ramp) == pytest.approx(-1.0)
    assert np.isnan(rank_correlation(ramp, np.zeros((4, 4))))  # an all-zero map


def test_shuffled_kernels_keep_distribution_and_lose_structure(tiny_run: Path) -> None:
    from exporter.export import load_keras
    from trainer.sanity_check import shuffled_kernels_model

    original = load_keras(tiny_run / "model.keras").get_weights()
    shuffled = shuffled_kernels_model(tiny_run / "model.keras", seed=0).get_weights()
    again = shuffled_kernels_model(tiny_run / "model.keras", seed=0).get_weights()
    for w, s, s2 in zip(original, shuffled, again, strict=True):
        assert np.array_equal(s, s2)  # deterministic per seed
        if w.ndim >= 2:  # kernels: same values, another order
            assert np.array_equal(np.sort(w.ravel()), np.sort(s.ravel()))
            assert not np.array_equal(w, s)
        else:  # biases, BatchNorm parameters and statistics stay
            assert np.array_equal(w, s)


def test_explain_eval_rejects_unknown_method(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from trainer.explain_eval import main

    code = main(
        ["--model-dir", str(tmp_path), "--data", str(tmp_path), "--methods", "gradcam,nope"]
    )
    assert code == 2
    assert "nope" in capsys.readouterr().err


def test_aggregate_populations() -> None:
    from trainer.explain_eval import _PER_IMAGE, aggregate

    def row(path: str, lesion: bool, off_brain: float, energy: float = float("nan")) -> dict:
        r = dict.fromkeys(_PER_IMAGE, float("nan"))
        r.update(path=path, has_lesion=lesion, off_brain_mass=off_brain, energy_in_mask=energy,
                 empty_map=float(np.isnan(off_brain)))
        return r

    out = aggregate([row("a", True, 0.1, 0.6), row("b", True, 0.3, 0.2),
                     row("c", False, 0.9), row("d", False, float("nan"))])
    assert out["energy_in_mask"] == pytest.approx(0.4)  # tumour images only
    assert out["off_brain_mass"] == pytest.approx((0.1 + 0.3 + 0.9) / 3)  # empty map left out
    assert out["off_brain_mass_tumour"] == pytest.approx(0.2)
    assert out["empty_map"] == pytest.approx(0.25)
    assert (out["n_images"], out["n_lesion_images"]) == (4, 2)
