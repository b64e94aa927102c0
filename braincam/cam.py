"""Class activation maps, all computed from one run of the Grad-CAM graph.

gradcam.onnx returns the activations A [N,h,w,C] of the explained layer and the
gradients G = d(pre-softmax score of the target class)/dA, both NHWC float32.
Every method here is a function of (A, G) alone, so one forward+backward pass
serves them all.

`CAMMethod` owns the pipeline shared by every method:

    combine(A, G) -> [N,h,w]  ->  ReLU  ->  min-max to [0,1] per image  ->  resize

`WeightedCAM` methods only say how to weight channels (the map is then
sum_c w_c * A_c); the others override `combine` directly. Each fits in a few lines.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import cv2
import numpy as np

from braincam.errors import InvalidParameter

# Added to denominators that are sums of activations (>= 0 after a ReLU layer but
# possibly 0 for a dead channel).
EPS = 1e-7


def _as_batch(x: np.ndarray, what: str) -> np.ndarray:
    """[h,w,C] or [N,h,w,C] -> float32 [N,h,w,C]."""
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"{what} must be [N,h,w,C] or [h,w,C], got shape {arr.shape}")
    return arr


def normalize(cams: np.ndarray) -> np.ndarray:
    """Min-max each map of [N,H,W] to [0,1]; a constant (e.g. all-zero) map becomes zeros.

    Non-finite values are treated as 0 so a degenerate gradient can never put a NaN
    into a response.
    """
    cams = np.nan_to_num(np.asarray(cams, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo = cams.min(axis=(1, 2), keepdims=True)
    span = cams.max(axis=(1, 2), keepdims=True) - lo
    # Division only where the map is not constant; a flat map carries no location.
    out = np.divide(cams - lo, span, out=np.zeros_like(cams), where=span > 0)
    return np.clip(out, 0.0, 1.0)


def resize_cam(cams: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of [0,1] maps [N,H,W] (or one [H,W]) to size=(width, height)."""
    width, height = int(size[0]), int(size[1])
    if width < 1 or height < 1:
        raise InvalidParameter(f"CAM size must be positive (width, height), got {size}")
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim == 2:
        return resize_cam(cams[None], size)[0]
    if cams.shape[1:] == (height, width):
        return cams.copy()
    out = np.empty((cams.shape[0], height, width), dtype=np.float32)
    for i, cam in enumerate(cams):
        out[i] = cv2.resize(cam, (width, height), interpolation=cv2.INTER_LINEAR)
    # Linear interpolation of values in [0,1] stays in [0,1] up to rounding.
    return np.clip(out, 0.0, 1.0)


class CAMMethod(ABC):
    """One CAM method; call it with activations and gradients from gradcam.onnx."""

    name: str
    uses_gradients: bool = True

    @abstractmethod
    def combine(self, acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
        """[N,h,w,C] activations and gradients -> raw map [N,h,w] (before ReLU)."""

    def __call__(
        self, acts: np.ndarray, grads: np.ndarray | None, size: tuple[int, int] | None = None
    ) -> np.ndarray:
        """Maps [N,H,W] float32 in [0,1]; size=(width, height), or the layer's own h x w."""
        a = _as_batch(acts, "activations")
        if grads is None:
            if self.uses_gradients:
                raise ValueError(f"{self.name} needs gradients")
            g = np.zeros_like(a)
        else:
            g = _as_batch(grads, "gradients")
            if g.shape != a.shape:
                raise ValueError(f"gradients {g.shape} do not match activations {a.shape}")
        # Only positive evidence for the target class is shown (as in the Grad-CAM paper).
        cams = normalize(np.maximum(self.combine(a, g), 0.0))
        return cams if size is None else resize_cam(cams, size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class WeightedCAM(CAMMethod):
    """Methods whose map is a channel-weighted sum of the activations."""

    @abstractmethod
    def weights(self, acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
        """[N,h,w,C] -> channel weights [N,C]."""

    def combine(self, acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
        return np.einsum("nhwc,nc->nhw", acts, self.weights(acts, grads))


class GradCAM(WeightedCAM):
    """Grad-CAM (Selvaraju et al. 2017): weights are the spatially averaged gradients."""

    name = "gradcam"

    def weights(self, acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
        return grads.mean(axis=(1, 2))


class GradCAMPlusPlus(WeightedCAM):
    """Grad-CAM++ (Chattopadhyay et al. 2018), closed form for an exponential score.

    With Y = exp(S) and S the pre-softmax score, the paper's higher derivatives reduce
    to powers of G = dS/dA:  alpha_ij = G_ij^2 / (2 G_ij^2 + (sum_ab A_ab) G_ij^3),
    weights w_c = sum_ij alpha_ij ReLU(G_ij).
    """

    name = "gradcam++"

    def weights(self, acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
        # float64: G^3 of small gradients (~1e-15) underflows in float32.
        g = grads.astype(np.float64)
        g2 = g * g
        sum_a = acts.astype(np.float64).sum(axis=(1, 2), keepdims=True)
        denom = 2.0 * g2 + sum_a * g2 * g
        # alpha is 0 where the gradient is 0 (the paper's convention for 0/0).
        alpha = np.divide(g2, denom, out=np.zeros_like(g2), where=(g != 0) & (denom != 0))
        return (alpha * np.maximum(g, 0.0)).sum(axis=(1, 2)).astype(np.float32)


class XGradCAM(WeightedCAM):
    """XGrad-CAM (Fu et al. 2020): gradients weighted by the normalised activations."""

    name = "xgradcam"

    def weights(self, acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
        return (grads * acts).sum(axis=(1, 2)) / (acts.sum(axis=(1, 2)) + EPS)


class HiResCAM(CAMMethod):
    """HiResCAM (Draelos & Carin 2020): elementwise G*A, no spatial averaging.

    Provably faithful for models ending in global average pooling + dense layer.
    """

    name = "hirescam"

    def combine(self, acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
        return (grads * acts).sum(axis=3)


class LayerCAM(CAMMethod):
    """LayerCAM (Jiang et al. 2021): positive gradients as per-location weights."""

    name = "layercam"

    def combine(self, acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
        return (np.maximum(grads, 0.0) * acts).sum(axis=3)


class EigenCAM(CAMMethod):
    """Eigen-CAM (Muhammad & Yeasin 2020): first principal component of the activations.

    Class-agnostic (gradients are ignored): it shows what the layer responds to most,
    which is a useful check when gradients are noisy or saturated.
    """

    name = "eigencam"
    uses_gradients = False

    def combine(self, acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
        n, h, w, c = acts.shape
        x = acts.reshape(n, h * w, c).astype(np.float64)
        centred = x - x.mean(axis=1, keepdims=True)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        proj = np.einsum("npc,nc->np", centred, vt[:, 0, :])
        # An SVD's sign is arbitrary: orient the component so that it correlates
        # positively with the mean activation (where the layer fires, the map is high).
        mean_act = x.mean(axis=2)
        corr = (
            (proj - proj.mean(axis=1, keepdims=True))
            * (mean_act - mean_act.mean(axis=1, keepdims=True))
        ).sum(axis=1)
        proj *= np.where(corr < 0, -1.0, 1.0)[:, None]
        return proj.reshape(n, h, w).astype(np.float32)


METHODS: dict[str, CAMMethod] = {
    m.name: m
    for m in (GradCAM(), GradCAMPlusPlus(), HiResCAM(), XGradCAM(), LayerCAM(), EigenCAM())
}


# Gradient-free methods computed from the classifier alone (braincam/occlusion.py):
# always offered for models without a Grad-CAM graph, for the others on request
# (they cost one classifier run per occluding window).
CLASSIFIER_METHODS: tuple[str, ...] = ("occlusion",)


def available_methods(gradient_graph: bool, classifier_methods: bool = False) -> list[str]:
    """The explanation methods a model offers: the CAM methods when it has a Grad-CAM
    graph, the classifier-only ones when it has none or when asked for."""
    offered = list(METHODS) if gradient_graph else []
    if classifier_methods or not gradient_graph:
        offered.extend(CLASSIFIER_METHODS)
    return offered


def default_method(gradient_graph: bool) -> str:
    """What /explain uses when no method is named."""
    return "gradcam" if gradient_graph else CLASSIFIER_METHODS[0]


def get_method(method: str) -> CAMMethod:
    """Look a method up by name; unknown names raise InvalidParameter listing valid ones."""
    try:
        return METHODS[method]
    except (KeyError, TypeError):
        raise InvalidParameter(
            f"unknown CAM method {method!r}; valid methods: {', '.join(METHODS)}"
        ) from None


def compute_cam(
    method: str,
    acts: np.ndarray,
    grads: np.ndarray | None,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """CAMs [N,H,W] float32 in [0,1] by method name; size=(width, height).

    A single [h,w,C] input is treated as a batch of one (the result is [1,H,W]).
    """
    return get_method(method)(acts, grads, size)


def flip_smoothed(cams_orig: np.ndarray, cams_flipped: np.ndarray) -> np.ndarray:
    """Test-time augmentation: average a CAM with the CAM of the left-right flipped image.

    `cams_flipped` was computed on the flipped image, so it is flipped back before
    averaging. Accepts [N,H,W] or [H,W]; the result is renormalised to [0,1] per map.
    """
    orig = np.asarray(cams_orig, dtype=np.float32)
    flipped = np.asarray(cams_flipped, dtype=np.float32)
    if orig.shape != flipped.shape:
        raise ValueError(f"CAM shapes differ: {orig.shape} vs {flipped.shape}")
    if orig.ndim == 2:
        return flip_smoothed(orig[None], flipped[None])[0]
    if orig.ndim != 3:
        raise ValueError(f"CAMs must be [N,H,W] or [H,W], got shape {orig.shape}")
    return normalize(0.5 * (orig + flipped[:, :, ::-1]))
