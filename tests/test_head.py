"""The head mask, its rim and the map's shares outside/on them, on demo slices (real MNI
brain slices with synthetic lesions, trainer/demo_data.py)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from braincam.head import (
    HEAD_WARNING,
    OUTSIDE_THRESHOLD,
    HeadCheck,
    check_head,
    head_mask,
    head_rim,
    heat_on_rim,
    heat_outside_head,
    work_size,
)
from trainer.demo_data import CLASSES, render_sample

SIZE = 150  # the demo model's input size
PER_CLASS = 5


@pytest.fixture(scope="module")
def samples() -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(class, image, lesion mask, brain mask) for a few slices of every class."""
    return [
        (cls, *render_sample((11, 1, c, i), cls, SIZE))
        for c, cls in enumerate(CLASSES)
        for i in range(PER_CLASS)
    ]


def _full(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A working-grid mask at the image's size (nearest neighbour)."""
    return cv2.resize(mask.astype(np.uint8), (shape[1], shape[0]),
                      interpolation=cv2.INTER_NEAREST).astype(bool)


def test_work_size_keeps_the_aspect_and_never_enlarges() -> None:
    assert work_size((150, 150)) == (64, 64)
    assert work_size((512, 256)) == (32, 64)
    assert work_size((40, 30)) == (30, 40)


def test_mask_holds_brain_and_lesion_and_not_the_corners(samples: list) -> None:
    for cls, img, lesion, brain in samples:
        mask = head_mask(img)
        assert mask.shape == (64, 64)
        full = _full(mask, img.shape)
        assert full[brain > 0].all(), cls
        assert full[lesion > 0].all(), cls
        corner = SIZE // 10
        for rows, cols in ((slice(0, corner), slice(0, corner)),
                           (slice(-corner, None), slice(-corner, None)),
                           (slice(0, corner), slice(-corner, None)),
                           (slice(-corner, None), slice(0, corner))):
            assert not full[rows, cols].any(), cls
        # The head (brain + skull + scalp) is larger than the brain, but not the image.
        assert brain.astype(bool).mean() < full.mean() < 0.8


def test_rim_is_the_outer_band_outside_the_brain(samples: list) -> None:
    for cls, img, _, brain in samples:
        mask = head_mask(img)
        rim = head_rim(mask)
        assert rim.any() and not (rim & ~mask).any()
        assert rim.sum() < 0.4 * mask.sum()
        # The band is the skull and scalp: (almost) none of the brain is in it.
        full_rim = _full(rim, img.shape)
        assert (full_rim & (brain > 0)).sum() <= 0.01 * (brain > 0).sum(), cls
        # Every pixel of the mask's outer edge is on the rim.
        edge = mask & ~cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        assert rim[edge].all()


def test_rgb_and_gray_give_the_same_mask(samples: list) -> None:
    _, img, _, _ = samples[0]
    assert np.array_equal(head_mask(img), head_mask(np.dstack([img, img, img])))
    assert np.array_equal(head_mask(img), head_mask(np.dstack([img, img, img, img])))


def test_shares_of_a_map_in_the_background_and_on_the_lesion(samples: list) -> None:
    for cls, img, lesion, _ in samples:
        mask = head_mask(img)
        background = np.zeros(img.shape, np.float32)
        background[:15, :15] = 1.0  # the top-left corner: air
        assert heat_outside_head(background, mask) == pytest.approx(1.0, abs=0.01)
        assert heat_on_rim(background, head_rim(mask)) == pytest.approx(0.0, abs=1e-3)
        check = check_head(img, background)
        assert check.outside and HEAD_WARNING == "heat_outside_head"
        assert "outside the head" in (check.warning() or "")
        if cls == "notumor":
            continue
        on_lesion = (lesion > 0).astype(np.float32)
        assert heat_outside_head(on_lesion, mask) == pytest.approx(0.0, abs=1e-3)
        assert not check_head(img, on_lesion).outside
        assert check_head(img, on_lesion).warning() is None


def test_share_follows_the_mass_of_a_split_map(samples: list) -> None:
    _, img, _, brain = samples[0]
    mask = head_mask(img)
    cam = np.zeros(img.shape, np.float32)
    cam[:20, :20] = 1.0  # 400 px of air
    cam[brain > 0] = 400.0 / float((brain > 0).sum())  # the same mass on the brain
    assert heat_outside_head(cam, mask) == pytest.approx(0.5, abs=0.02)


def test_rim_share_of_a_map_on_the_scalp(samples: list) -> None:
    _, img, _, _ = samples[0]
    mask = head_mask(img)
    rim = head_rim(mask)
    cam = _full(rim, img.shape).astype(np.float32)
    on_rim, outside = heat_on_rim(cam, rim), heat_outside_head(cam, mask)
    assert on_rim is not None and on_rim > 0.9
    assert outside is not None and outside < 0.1


def test_flat_map_and_blank_image_have_no_share(samples: list) -> None:
    _, img, _, _ = samples[0]
    mask = head_mask(img)
    flat = np.zeros(img.shape, np.float32)
    assert heat_outside_head(flat, mask) is None
    assert heat_on_rim(flat, head_rim(mask)) is None
    assert heat_outside_head(np.full(img.shape, np.nan, np.float32), mask) is None
    check = check_head(img, flat)
    assert check.as_dict() == {"heat_outside_head": None, "heat_on_rim": None}
    assert not check.outside and check.warning() is None
    blank = np.zeros((SIZE, SIZE), np.uint8)
    assert not head_mask(blank).any()
    assert check_head(blank, np.ones((SIZE, SIZE), np.float32)).heat_outside_head is None


def test_no_warning_for_the_no_finding_class_but_the_share_is_kept() -> None:
    check = HeadCheck(heat_outside_head=0.9, heat_on_rim=0.05, meaningful=False)
    assert check.heat_outside_head == 0.9 and not check.outside and check.warning() is None
    at = HeadCheck(heat_outside_head=OUTSIDE_THRESHOLD, heat_on_rim=0.0, meaningful=True)
    assert not at.outside  # strictly above the threshold
    above = HeadCheck(heat_outside_head=0.9, heat_on_rim=0.0, meaningful=True)
    assert above.outside and "90%" in (above.warning() or "")


def test_a_head_cut_by_the_border_and_a_small_off_centre_head(samples: list) -> None:
    _, img, _, brain = samples[0]
    # Cut: the right third of the slice is outside the field of view.
    cut, cut_brain = img[:, : SIZE * 2 // 3], brain[:, : SIZE * 2 // 3]
    mask = head_mask(cut)
    assert _full(mask, cut.shape)[cut_brain > 0].all()
    # The cut edge is not the skull: the rim runs along it only where the skull crosses.
    assert head_rim(mask)[:, -1].sum() < 0.25 * mask[:, -1].sum()
    # Small and off-centre: the slice shrunk into a corner of a larger canvas.
    canvas = np.zeros((300, 300), np.uint8)
    canvas[:100, :100] = cv2.resize(img, (100, 100), interpolation=cv2.INTER_AREA)
    small = _full(head_mask(canvas), canvas.shape)
    assert small[:100, :100].mean() > 0.35 and not small[100:, 100:].any()
