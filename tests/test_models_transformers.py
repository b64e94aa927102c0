"""Real-size vision transformers and ConvNeXt (random weights) through the ONNX path:
torchvision's ViT-B/16, Swin-T and ConvNeXt-T by torch.onnx, Keras 3's ConvNeXtTiny by
tf2onnx, all at 224x224: the explained tensor is found, the gate passes, /explain
serves a map. Heavy (minutes, GBs): marked `models`, run by `make test-models`, not
by `make test`. Their time, memory and graph cost: benchmarks/bench_transformers.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.models

SIZE = 224
LABELS = ["glioma", "meningioma", "notumor", "pituitary"]
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _torchvision(name: str) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        torch = pytest.importorskip("torch")
        tvm = pytest.importorskip("torchvision.models")
        torch.manual_seed(0)
        model = getattr(tvm, name)(num_classes=4).eval()
        with torch.no_grad():  # torchvision zero-initialises heads and 1e-6 layer scales
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        torch.onnx.export(model, (torch.zeros(1, 3, SIZE, SIZE),), str(path),
                          input_names=["input"], output_names=["logits"], opset_version=17,
                          dynamo=False, dynamic_axes={"input": {0: "batch"},
                                                      "logits": {0: "batch"}})

    return write


def _keras_convnext(path: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    import keras
    import onnx

    from exporter.convert import to_onnx

    keras.utils.set_random_seed(0)
    model = keras.applications.ConvNeXtTiny(weights=None, input_shape=(SIZE, SIZE, 3), classes=4)
    fn = tf.function(lambda x: model(x, training=False),
                     input_signature=[tf.TensorSpec((None, SIZE, SIZE, 3), tf.float32,
                                                    name="image")])
    onnx.save(to_onnx(fn, 17), str(path))


# writer, exporter options, the explained tensor's name prefix, the map h x w x C
MODELS: dict[str, tuple[Callable[[Path], None], dict[str, Any], str, list[int]]] = {
    "vit_b_16": (_torchvision("vit_b_16"), IMAGENET,
                 "/encoder/layers/encoder_layer_11/ln_1/", [14, 14, 768]),
    "swin_t": (_torchvision("swin_t"), IMAGENET, "/permute/", [7, 7, 768]),
    "convnext_tiny": (_torchvision("convnext_tiny"), IMAGENET, "/features/features.7/",
                      [7, 7, 768]),
    "keras_convnext_tiny": (_keras_convnext, {"scale": "none"}, "convnext_tiny", [7, 7, 768]),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_real_size_model_exports_and_serves(name: str, demo_data: Path, tmp_path: Path) -> None:
    from exporter.onnx_export import export_onnx_model
    from service.core.config import Settings
    from tests.clients import ready_client

    write, options, prefix, shape = MODELS[name]
    source = tmp_path / f"{name}.onnx"
    write(source)
    out = tmp_path / "models" / name
    result = export_onnx_model(source, out, labels=LABELS, calibration=demo_data / "Testing",
                               **options)
    spec = result.spec
    assert spec.explanation.layer.startswith(prefix), spec.explanation.layer
    assert spec.explanation.activation_shape == shape
    assert spec.parity["passed"] and spec.parity["gradient_abs_max"] > 0
    image = sorted((demo_data / "Testing" / "glioma").glob("*.png"))[0]
    settings = Settings(model_dir=out, providers="CPUExecutionProvider")
    with ready_client(settings) as client:
        res = client.post("/explain", files={"file": (image.name, image.read_bytes())},
                          data={"method": "gradcam", "heatmap": "list", "images": "overlay"})
        assert res.status_code == 200, res.text
        cam = np.asarray(res.json()["cam"]["data"], np.float32)
        # (random weights: Grad-CAM's ReLU may leave a flat map on an image)
        assert list(cam.shape) == shape[:2] and np.isfinite(cam).all()
