"""Vision transformers and ConvNeXt through the ONNX path: the explained tensor found
automatically, the gradients equal torch autograd's (pytorch-grad-cam's layers and
reshape_transform by hand), the gate, and the exported directory served."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from braincam.preprocessing import Preprocessing
from exporter.errors import ExportError
from exporter.onnx_grad import build_graphs

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
from tests.torch_models import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    TinyDeiT,
    export,
    perturb,
    tiny_convnext,
    tiny_swin,
    tiny_vit,
)

SIZE = 32
LABELS = ["glioma", "meningioma", "notumor", "pituitary"]
torch.set_num_threads(1)


def _prep() -> Preprocessing:
    return Preprocessing(height=SIZE, width=SIZE, channels=3, layout="nchw",
                         mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _tokens_to_grid(skip: int, side: int) -> Callable[[Any], Any]:
    """pytorch-grad-cam's reshape_transform, NHWC."""
    return lambda t: t[:, skip:].reshape(t.shape[0], side, side, t.shape[2])


# factory, the module whose output pytorch-grad-cam would hook, its output -> NHWC grid,
# the explained tensor's ONNX name prefix
MODELS: dict[str, tuple[Callable[[], Any], Callable[[Any], Any], Callable[[Any], Any], str]] = {
    "vit": (lambda: tiny_vit(SIZE), lambda m: m.encoder.layers[-1].ln_1, _tokens_to_grid(1, 4),
            "/encoder/layers/encoder_layer_1/ln_1/"),
    "deit_distilled": (lambda: TinyDeiT(size=SIZE), lambda m: m.blocks[-1].norm1,
                       _tokens_to_grid(2, 4), "/blocks/blocks.1/norm1/"),
    "swin": (tiny_swin, lambda m: m.norm, lambda t: t, "/permute/"),
    "convnext": (tiny_convnext, lambda m: m.features[-1], lambda t: t.permute(0, 2, 3, 1),
                 "/features/features.3/features.3.1/"),
}


def _autograd(model: Any, module: Any, to_grid: Callable[[Any], Any], x: np.ndarray,
              classes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    captured: list[Any] = []
    handle = module.register_forward_hook(lambda mod, inp, out: captured.append(out))
    try:
        logits = model(torch.from_numpy(x))
    finally:
        handle.remove()
    score = logits.gather(1, torch.from_numpy(classes)[:, None]).sum()
    (grad,) = torch.autograd.grad(score, captured[-1])
    return (torch.softmax(logits, 1).detach().numpy(), to_grid(captured[-1]).detach().numpy(),
            to_grid(grad).numpy())


@pytest.mark.parametrize("arch,opset", [(arch, 17) for arch in MODELS]
                         + [("vit", 20), ("deit_distilled", 20), ("vit", 14)])
def test_gradients_equal_torch_autograd(arch: str, opset: int) -> None:
    """Opset 20: torch writes GELU as one Gelu node (erf and tanh forms); 17: Erf or
    Tanh arithmetic; 14: LayerNorm written out (ReduceMean, Pow, Sqrt, Div)."""
    factory, module_of, to_grid, prefix = MODELS[arch]
    torch.manual_seed(0)
    model = perturb(factory())
    built = build_graphs(export(model, SIZE, opset=opset), _prep())
    assert built.found.explained.startswith(prefix), built.found.explained
    session = ort.InferenceSession(built.gradcam.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch in (1, 5):  # the graphs' reshapes must not have kept the traced batch
        x = rng.standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32)
        target = np.full(batch, -1, np.int64)
        target[::2] = 3
        probs, classes, acts, grads = session.run(None, {"image": x, "target": target})
        ref_probs, ref_acts, ref_grads = _autograd(model, module_of(model), to_grid, x, classes)
        assert acts.shape == ref_acts.shape == grads.shape
        assert list(acts.shape[1:]) == built.activation_shape
        np.testing.assert_allclose(probs, ref_probs, atol=1e-5)
        np.testing.assert_allclose(acts, ref_acts, atol=1e-5 * np.abs(ref_acts).max())
        assert np.abs(ref_grads).max() > 0
        assert np.abs(grads - ref_grads).max() <= 1e-4 * np.abs(ref_grads).max()


def test_vit_token_grid_drops_class_and_distillation_tokens() -> None:
    torch.manual_seed(0)
    vit = build_graphs(export(perturb(tiny_vit(SIZE)), SIZE), _prep())
    deit = build_graphs(export(perturb(TinyDeiT(size=SIZE)), SIZE), _prep())
    assert vit.found.tokens is not None and deit.found.tokens is not None
    assert (vit.found.tokens.offset, vit.found.tokens.height, vit.found.tokens.width) == (1, 4, 4)
    assert (deit.found.tokens.offset, deit.found.tokens.count) == (2, 16)
    assert vit.activation_shape == [4, 4, 24] and deit.activation_shape == [4, 4, 24]


def test_layer_names_an_earlier_token_tensor() -> None:
    """--layer on the first block's LayerNorm: the tokens are found as tokens, and the
    gradient is torch's (the residual stream around it held fixed)."""
    torch.manual_seed(0)
    model = perturb(tiny_vit(SIZE))
    layer = "/encoder/layers/encoder_layer_0/ln_1/LayerNormalization_output_0"
    built = build_graphs(export(model, SIZE), _prep(), layer=layer)
    assert built.found.explained == layer and built.found.tokens is not None
    session = ort.InferenceSession(built.gradcam.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    _, classes, _, grads = session.run(None, {"image": x, "target": np.full(3, -1, np.int64)})
    _, _, ref = _autograd(model, model.encoder.layers[0].ln_1, _tokens_to_grid(1, 4), x, classes)
    assert np.abs(grads - ref).max() <= 1e-4 * np.abs(ref).max()


def test_a_wrong_layernorm_rule_fails_the_gate(
    demo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from exporter.onnx_export import export_onnx_model
    from exporter.onnx_grad import rules

    torch.manual_seed(0)
    path = tmp_path / "vit.onnx"
    export(perturb(tiny_vit(SIZE)), SIZE, path)
    ln = rules.RULES["LayerNormalization"]
    # the scale only, as if the normalisation had no derivative of its own
    monkeypatch.setitem(rules.RULES, "LayerNormalization", rules.Rule(
        lambda em, node, g: [em.node("Mul", [g[0], node.input[1]])], ln.diff_inputs))
    with pytest.raises(ExportError, match="finite differences"):
        export_onnx_model(path, tmp_path / "out", labels=LABELS,
                          calibration=demo_data / "Testing")
    assert not (tmp_path / "out").exists()


def test_a_vit_exported_from_the_command_line_is_served_with_a_map(
    demo_data: Path, tmp_path: Path
) -> None:
    """python -m exporter --model vit.onnx, then /predict, /explain, the web page and a
    Triton repository, as for any CNN."""
    from service.core.config import Settings
    from tests.clients import ready_client

    torch.manual_seed(0)
    model = perturb(tiny_vit(SIZE))
    path = tmp_path / "vit.onnx"
    export(model, SIZE, path)
    out = tmp_path / "models" / "vit"
    proc = subprocess.run(
        [sys.executable, "-m", "exporter", "--model", str(path), "--out", str(out),
         "--labels", ",".join(LABELS), "--mean", *map(str, IMAGENET_MEAN),
         "--std", *map(str, IMAGENET_STD), "--calibration", str(demo_data / "Testing")],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec = json.loads((out / "model.json").read_text())
    assert spec["explanation"]["layer"].startswith("/encoder/layers/encoder_layer_1/ln_1/")
    assert spec["explanation"]["activation_shape"] == [4, 4, 24]
    assert spec["parity"]["passed"] and spec["parity"]["gradient_fd_max_rel_err"] < 1e-3
    image = sorted((demo_data / "Testing" / "glioma").glob("*.png"))[0]
    settings = Settings(model_dir=out, providers="CPUExecutionProvider")
    with ready_client(settings) as client:
        res = client.post("/explain", files={"file": (image.name, image.read_bytes())},
                          data={"method": "gradcam", "heatmap": "list", "images": "overlay"})
        assert res.status_code == 200, res.text
        body = res.json()
        cam = np.asarray(body["cam"]["data"], np.float32)
        assert cam.shape == (4, 4) and np.isfinite(cam).all() and cam.max() > cam.min()
        assert body["overlay_png"]
        assert client.get("/").status_code == 200
    from exporter import triton

    assert triton.main(["--model-dir", str(out), "--repo", str(tmp_path / "triton")]) == 0


def test_keras_grouped_convolution_and_exact_gelu_convert() -> None:
    """Keras 3 runs grouped convolutions on CPU in an XLA-compiled function and writes
    its exact GELU with Erfc: tf2onnx converts neither by itself. The converted model
    gives Keras' outputs, and the builder's gradients equal GradientTape's."""
    tf = pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    import keras

    from exporter.convert import to_onnx

    keras.utils.set_random_seed(0)
    inp = keras.Input((SIZE, SIZE, 3), name="image_in")
    h = keras.layers.Conv2D(8, 4, strides=4)(inp)
    block = keras.layers.Conv2D(8, 7, padding="same", groups=8, name="depthwise")(h)  # ConvNeXt
    block = keras.layers.LayerNormalization(epsilon=1e-6)(block)
    block = keras.layers.Dense(16, activation=keras.activations.gelu)(block)  # exact: Erfc
    feat = keras.layers.Add(name="last_block")([h, keras.layers.Dense(8)(block)])
    pooled = keras.layers.LayerNormalization()(keras.layers.GlobalAveragePooling2D()(feat))
    out = keras.layers.Dense(4, activation="softmax")(pooled)
    model = keras.Model(inp, out)
    fn = tf.function(lambda x: model(x, training=False),
                     input_signature=[tf.TensorSpec((None, SIZE, SIZE, 3), tf.float32,
                                                    name="image_in")])
    proto = to_onnx(fn, 17)
    ops = {n.op_type for n in proto.graph.node}
    assert "Erf" in ops and not ops & {"Erfc", "StatefulPartitionedCall", "PartitionedCall"}
    assert any(a.name == "group" and a.i == 8 for n in proto.graph.node for a in n.attribute)
    built = build_graphs(proto, Preprocessing(height=SIZE, width=SIZE, channels=3))
    session = ort.InferenceSession(built.gradcam.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((4, SIZE, SIZE, 3), dtype=np.float32)
    probs, classes, acts, grads = session.run(None, {"image": x,
                                                     "target": np.full(4, -1, np.int64)})
    np.testing.assert_allclose(probs, model(x).numpy(), atol=1e-5)
    features = keras.Model(inp, feat)
    head = keras.Model(feat, model.layers[-1].input)
    dense = model.layers[-1]
    a = tf.constant(features(x).numpy())
    with tf.GradientTape() as tape:
        tape.watch(a)
        logits = tf.matmul(head(a), dense.kernel) + dense.bias
        score = tf.reduce_sum(tf.gather(logits, classes, axis=1, batch_dims=1))
    ref = tape.gradient(score, a).numpy()
    np.testing.assert_allclose(acts, a.numpy(), atol=1e-5)
    assert np.abs(grads - ref).max() <= 1e-4 * np.abs(ref).max()


def test_an_op_without_a_rule_names_the_nearest_usable_layer() -> None:
    class SoftplusInside(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
            self.conv3 = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)
            self.fc = torch.nn.Linear(6, 4)

        def forward(self, x: Any) -> Any:
            h = torch.relu(self.conv1(x))
            h = torch.nn.functional.softplus(self.conv2(h))
            h = torch.relu(self.conv3(h))
            return self.fc(h.mean(dim=(2, 3)))

    proto = export(SoftplusInside().eval(), SIZE)
    first = "/Relu_output_0"  # conv1's activation: Softplus lies between it and the scores
    with pytest.raises(ExportError, match=r"no backward rule for op 'Softplus' \(node "
                                          r"'/Softplus'\) .* nearest usable --layer after it "
                                          r"is '/conv3/Conv_output_0'"):
        build_graphs(proto, _prep(), layer=first)
    assert build_graphs(proto, _prep()).found.explained == "/Relu_1_output_0"
