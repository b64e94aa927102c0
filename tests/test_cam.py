"""CAM methods on hand-made activations and gradients whose right answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from braincam.cam import METHODS, CAMMethod, compute_cam, flip_smoothed, normalize, resize_cam
from braincam.errors import InvalidParameter

H = W = 8
SQUARE = (slice(1, 4), slice(1, 4))  # where the class evidence sits
ELSEWHERE = (slice(5, 8), slice(5, 8))
GRADIENT_METHODS = [m for m in METHODS if m != "eigencam"]


def two_channel_case() -> tuple[np.ndarray, np.ndarray]:
    """Channel 0 fires in SQUARE with a positive gradient (evidence for the class);
    channel 1 fires ELSEWHERE with a negative gradient (evidence against)."""
    acts = np.zeros((1, H, W, 2), np.float32)
    grads = np.zeros_like(acts)
    acts[0][SQUARE][..., 0] = 1.0
    acts[0][ELSEWHERE][..., 1] = 1.0
    grads[..., 0] = 0.5
    grads[..., 1] = -0.5
    return acts, grads


def square_mask() -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[SQUARE] = True
    return m


def test_registry_names() -> None:
    assert list(METHODS) == ["gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam"]
    for name, method in METHODS.items():
        assert isinstance(method, CAMMethod)
        assert method.name == name


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_peaks_in_square_zero_elsewhere(method: str) -> None:
    acts, grads = two_channel_case()
    cam = compute_cam(method, acts, grads)
    assert cam.shape == (1, H, W) and cam.dtype == np.float32
    assert cam[0][SQUARE].min() == pytest.approx(1.0)
    assert np.all(cam[0][~square_mask()] == 0.0)


def test_eigencam_recovers_dominant_pattern() -> None:
    # Many channels share one spatial pattern (a square) with channel-specific gains,
    # plus small noise: the first principal component is that pattern.
    rng = np.random.default_rng(0)
    pattern = square_mask().astype(np.float32)
    gains = rng.uniform(0.5, 2.0, size=16).astype(np.float32)
    acts = pattern[None, :, :, None] * gains + 0.02 * rng.random((1, H, W, 16), dtype=np.float32)
    cam = compute_cam("eigencam", acts, None)[0]
    inside, outside = cam[square_mask()], cam[~square_mask()]
    assert inside.min() > 0.9
    assert outside.max() < 0.1
    # Sign fixed: flipping the SVD's arbitrary sign must not invert the map.
    assert np.corrcoef(cam.ravel(), pattern.ravel())[0, 1] > 0.95


def test_eigencam_ignores_gradients() -> None:
    acts, grads = two_channel_case()
    a = compute_cam("eigencam", acts, grads)
    b = compute_cam("eigencam", acts, -grads)
    np.testing.assert_array_equal(a, b)


def test_hirescam_differs_from_gradcam() -> None:
    # One channel active in two places; its gradient is positive at the left blob and
    # strongly negative at the right one. Grad-CAM averages the gradient (negative
    # overall), so the whole channel is suppressed; HiResCAM keeps the left blob.
    acts = np.zeros((1, H, W, 1), np.float32)
    grads = np.zeros_like(acts)
    acts[0, 2, 1, 0] = acts[0, 2, 6, 0] = 1.0
    grads[0, 2, 1, 0] = 1.0
    grads[0, 2, 6, 0] = -3.0
    grad = compute_cam("gradcam", acts, grads)[0]
    hires = compute_cam("hirescam", acts, grads)[0]
    assert np.all(grad == 0.0)
    assert hires[2, 1] == 1.0 and hires[2, 6] == 0.0
    assert not np.allclose(grad, hires)


def test_gradcam_plus_plus_closed_form() -> None:
    # Uniform gradient g on one channel: alpha = 1 / (2 + sum(A) * g), w = h*w*alpha*g.
    acts = np.zeros((1, 4, 4, 1), np.float32)
    acts[0, 1, 1, 0] = 2.0
    grads = np.full_like(acts, 0.25)
    method = METHODS["gradcam++"]
    w = method.weights(acts, grads)  # type: ignore[attr-defined]
    expected = 16 * 0.25 / (2 + 2.0 * 0.25)
    assert w[0, 0] == pytest.approx(expected, rel=1e-6)


def test_gradcam_plus_plus_tiny_gradients_do_not_underflow() -> None:
    acts, grads = two_channel_case()
    cam = compute_cam("gradcam++", acts, grads * 1e-15)
    assert cam[0][SQUARE].min() == pytest.approx(1.0)


@pytest.mark.parametrize("method", list(METHODS))
def test_all_zero_input_gives_zeros_not_nan(method: str) -> None:
    z = np.zeros((2, H, W, 3), np.float32)
    cam = compute_cam(method, z, z, size=(20, 10))
    assert cam.shape == (2, 10, 20)
    assert np.isfinite(cam).all() and np.all(cam == 0.0)


@pytest.mark.parametrize("method", list(METHODS))
def test_random_input_in_unit_range_and_size_honoured(method: str) -> None:
    rng = np.random.default_rng(1)
    acts = np.maximum(rng.normal(size=(3, 5, 7, 6)), 0).astype(np.float32)
    grads = rng.normal(size=acts.shape).astype(np.float32)
    cam = compute_cam(method, acts, grads, size=(70, 50))  # (width, height)
    assert cam.shape == (3, 50, 70) and cam.dtype == np.float32
    assert cam.min() >= 0.0 and cam.max() <= 1.0
    native = compute_cam(method, acts, grads)
    assert native.shape == (3, 5, 7)


def test_single_image_without_batch_axis() -> None:
    acts, grads = two_channel_case()
    cam = compute_cam("gradcam", acts[0], grads[0], size=(16, 16))
    assert cam.shape == (1, 16, 16)
    np.testing.assert_allclose(cam, compute_cam("gradcam", acts, grads, size=(16, 16)))


def test_upsampling_is_bilinear_resize_of_normalised_map() -> None:
    acts, grads = two_channel_case()
    small = compute_cam("layercam", acts, grads)
    big = compute_cam("layercam", acts, grads, size=(32, 24))
    np.testing.assert_allclose(big, resize_cam(small, (32, 24)), atol=1e-6)


def test_unknown_method_raises_listing_valid_ones() -> None:
    acts, grads = two_channel_case()
    with pytest.raises(InvalidParameter) as err:
        compute_cam("scorecam", acts, grads)
    for name in METHODS:
        assert name in str(err.value)


def test_mismatched_shapes_rejected() -> None:
    acts, grads = two_channel_case()
    with pytest.raises(ValueError):
        compute_cam("gradcam", acts, grads[:, :4])
    with pytest.raises(ValueError):
        compute_cam("gradcam", acts, None)


def test_normalize_handles_constant_and_nan() -> None:
    cams = np.stack([np.full((4, 4), 3.0), np.full((4, 4), np.nan), np.arange(16.0).reshape(4, 4)])
    out = normalize(cams)
    assert np.all(out[0] == 0) and np.all(out[1] == 0)
    assert out[2].min() == 0.0 and out[2].max() == 1.0


def test_flip_smoothed() -> None:
    cam = np.zeros((1, 4, 6), np.float32)
    cam[0, 1, 0] = 1.0  # left edge
    # The flipped image's CAM sees the same feature at the right edge.
    flipped = cam[:, :, ::-1].copy()
    np.testing.assert_allclose(flip_smoothed(cam, flipped), cam)
    # Disagreeing maps are averaged, then renormalised to [0,1].
    other = np.zeros_like(cam)
    other[0, 3, 5] = 1.0  # flipped back: (3, 0)
    out = flip_smoothed(cam, other)
    assert out[0, 1, 0] == out[0, 3, 0] == 1.0
    assert flip_smoothed(cam[0], flipped[0]).shape == (4, 6)
