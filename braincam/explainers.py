"""Explanations from attribution.onnx: CAMs at a chosen layer, LayerCAM fused over
several layers, and pixel-resolution maps from the image gradient.

attribution.onnx (`python -m exporter attribution`) returns, from one forward +
backward run, the activations and gradients at several layers and the gradient of
the class score with respect to the image. `Explainer` owns the pipeline every method
shares, as braincam.cam's `CAMMethod` does for gradcam.onnx:

    raw(model, batch, targets) -> [N, h, w]  ->  rectify  ->  min-max to [0, 1]  ->  resize

so a method is its `raw` (and whether its sign means anything: `rectify`):

- `AtLayer(cam, layer)`: any braincam.cam method at an attribution layer
  (`method=hirescam&layer=block3_relu`).
- `FusedLayerCAM(layers)`: LayerCAM (Jiang et al. 2021) at each layer, each map scaled to
  [0, 1] and brought to the finest layer's grid, averaged (pytorch-grad-cam's
  aggregation of several target layers).
- `SmoothGrad(samples)` (Smilkov et al. 2017): the image gradient averaged over
  `samples` noisy copies (Gaussian, sigma 15 % of the image's value range), its
  magnitude; all copies are one batch.
- `IntegratedGradients(steps)` (Sundararajan et al. 2017): (x - x0) times the gradient
  averaged along the straight path from the black image x0 (midpoint rule, `steps`
  points, one batch); its positive part, the evidence for the class. Where the image
  is black the attribution is 0 by construction.

The explained class is chosen by the caller (the decision on the clean image), so the
noisy and interpolated copies explain that class, not their own argmax.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal

import numpy as np

from braincam.cam import CAMMethod, LayerCAM, get_method, normalize, resize_cam
from braincam.errors import InvalidParameter, MethodUnavailable
from braincam.inference import OnnxModel
from braincam.model_spec import IMAGE_INPUT
from braincam.preprocessing import Preprocessing, preprocess

Rectify = Literal["relu", "abs", "none"]
PIXEL_METHODS = ("smoothgrad", "integrated_gradients")
FUSED_METHOD = "layercam"
DEFAULT_SAMPLES = {"smoothgrad": 8, "integrated_gradients": 8}
MAX_SAMPLES = 64
NOISE_LEVEL = 0.15  # SmoothGrad's sigma / (max - min) of the input (the paper's 10-20 %)
NOISE_SEED = 0  # the same request gives the same map


class Explainer(ABC):
    """One explanation method read from attribution.onnx."""

    name: str
    layer: str  # what the response reports as the explained layer
    rectify: Rectify = "relu"
    runs: int = 1  # attribution graph runs per call

    @abstractmethod
    def raw(self, model: OnnxModel, batch: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """[N, ...] model inputs and their classes -> raw maps [N, h, w]."""

    def __call__(
        self, model: OnnxModel, batch: np.ndarray, targets: np.ndarray,
        size: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """Maps [N, H, W] float32 in [0, 1]; size=(width, height), else the method's own."""
        raw = np.asarray(self.raw(model, batch, np.asarray(targets, np.int64)), np.float32)
        if self.rectify == "relu":
            raw = np.maximum(raw, 0.0)
        elif self.rectify == "abs":
            raw = np.abs(raw)
        cams = normalize(raw)
        return cams if size is None else resize_cam(cams, size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, layer={self.layer!r})"


class AtLayer(Explainer):
    """A braincam.cam method (Grad-CAM, HiResCAM, ...) at one attribution layer."""

    def __init__(self, cam: CAMMethod, layer: str) -> None:
        self.cam, self.layer, self.name = cam, layer, cam.name

    def raw(self, model: OnnxModel, batch: np.ndarray, targets: np.ndarray) -> np.ndarray:
        acts, grads = model.attribution(batch, targets, [self.layer]).layers[self.layer]
        return self.cam.combine(acts, grads)


class FusedLayerCAM(Explainer):
    """LayerCAM at several layers, fused on the finest layer's grid."""

    name = FUSED_METHOD

    def __init__(self, layers: Sequence[str]) -> None:
        self.layers = list(layers)
        self.layer = "+".join(self.layers)

    def raw(self, model: OnnxModel, batch: np.ndarray, targets: np.ndarray) -> np.ndarray:
        out = model.attribution(batch, targets, self.layers)
        per_layer = [LayerCAM()(a, g) for a, g in out.layers.values()]  # [0, 1] each
        h, w = max((m.shape[1:] for m in per_layer), key=lambda s: s[0] * s[1])
        return np.mean([resize_cam(m, (w, h)) for m in per_layer], axis=0)


def _to_nhwc(x: np.ndarray, prep: Preprocessing) -> np.ndarray:
    return x.transpose(0, 2, 3, 1) if prep.layout == "nchw" else x


class SmoothGrad(Explainer):
    name = "smoothgrad"
    layer = IMAGE_INPUT
    rectify = "none"  # a magnitude already

    def __init__(self, samples: int = DEFAULT_SAMPLES["smoothgrad"],
                 noise: float = NOISE_LEVEL) -> None:
        self.samples, self.noise = samples, noise

    def raw(self, model: OnnxModel, batch: np.ndarray, targets: np.ndarray) -> np.ndarray:
        n, k = batch.shape[0], self.samples
        rng = np.random.default_rng(NOISE_SEED)
        span = (batch.reshape(n, -1).max(axis=1) - batch.reshape(n, -1).min(axis=1))
        sigma = (self.noise * span).reshape(n, 1, *([1] * (batch.ndim - 1)))
        noise = rng.standard_normal((n, k, *batch.shape[1:])).astype(np.float32)
        noisy = (batch[:, None] + sigma * noise).reshape(n * k, *batch.shape[1:])
        grads = model.attribution(noisy.astype(np.float32), np.repeat(targets, k),
                                  image_gradients=True).image_gradients
        assert grads is not None
        mean = grads.reshape(n, k, *batch.shape[1:]).mean(axis=1)
        return np.abs(_to_nhwc(mean, model.spec.preprocessing)).sum(axis=3)


def black_image(prep: Preprocessing) -> np.ndarray:
    """The model input of an all-black image (IG's baseline), in the model's layout."""
    zeros = np.zeros((prep.height, prep.width, prep.channels), np.uint8)
    return preprocess(zeros if prep.channels > 1 else zeros[:, :, 0], prep)


class IntegratedGradients(Explainer):
    name = "integrated_gradients"
    layer = IMAGE_INPUT

    def __init__(self, steps: int = DEFAULT_SAMPLES["integrated_gradients"]) -> None:
        self.steps = steps

    def raw(self, model: OnnxModel, batch: np.ndarray, targets: np.ndarray) -> np.ndarray:
        n, m = batch.shape[0], self.steps
        baseline = black_image(model.spec.preprocessing)[None]
        alphas = ((np.arange(m) + 0.5) / m).astype(np.float32)  # midpoint rule
        shape = (1, m, *([1] * (batch.ndim - 1)))
        path = baseline[:, None] + alphas.reshape(shape) * (batch - baseline)[:, None]
        grads = model.attribution(path.reshape(n * m, *batch.shape[1:]).astype(np.float32),
                                  np.repeat(targets, m), image_gradients=True).image_gradients
        assert grads is not None
        ig = (batch - baseline) * grads.reshape(n, m, *batch.shape[1:]).mean(axis=1)
        return _to_nhwc(ig, model.spec.preprocessing).sum(axis=3)


def attribution_methods(model: OnnxModel) -> list[str]:
    """The methods attribution.onnx adds (cam methods at its layers are named by layer=)."""
    return [FUSED_METHOD, *PIXEL_METHODS] if model.has_attribution else []


def cam_layers(model: OnnxModel) -> list[str]:
    """The layers `layer=` can name: the Grad-CAM graph's, then attribution.onnx's."""
    layers = [model.spec.explanation.layer] if model.has_gradcam else []
    if model.spec.attribution is not None and model.has_attribution:
        layers += [la.name for la in model.spec.attribution.layers
                   if la.name not in layers and la.tensor not in layers]
    return layers


def uses_attribution(method: str, layer: str | None, model: OnnxModel) -> bool:
    """Whether this request is served from attribution.onnx (else gradcam.onnx)."""
    if method in PIXEL_METHODS:
        return True
    if layer is not None:
        return not (model.has_gradcam and layer == model.spec.explanation.layer)
    return method == FUSED_METHOD and model.has_attribution


def make_explainer(method: str, layer: str | None, samples: int | None,
                   model: OnnxModel) -> Explainer:
    """The explainer of an attribution request, or a clear error (422) on what the model
    directory does not have."""
    spec = model.spec.attribution
    if not model.has_attribution or spec is None:
        raise MethodUnavailable(
            f"method {method!r}{'' if layer is None else f' at layer {layer!r}'} needs "
            "attribution.onnx, which this model directory does not have (add it with "
            "`python -m exporter attribution --model-dir DIR`)")
    if samples is not None and method not in PIXEL_METHODS:
        raise InvalidParameter(f"'samples' applies to {', '.join(PIXEL_METHODS)} only")
    if method in PIXEL_METHODS:
        if layer is not None and layer != IMAGE_INPUT:
            raise InvalidParameter(f"{method} explains the input pixels; 'layer' does not apply")
        n = DEFAULT_SAMPLES[method] if samples is None else samples
        if not 1 <= n <= MAX_SAMPLES:
            raise InvalidParameter(f"'samples' must be 1..{MAX_SAMPLES}, got {n}")
        return SmoothGrad(n) if method == "smoothgrad" else IntegratedGradients(n)
    if layer is None:
        return FusedLayerCAM([la.name for la in spec.layers])
    entry = spec.layer(layer)
    if entry is None:
        raise MethodUnavailable(
            f"layer {layer[:64]!r} is not in this model's attribution graph; layers: "
            + ", ".join(cam_layers(model)))
    return AtLayer(get_method(method), entry.name)
