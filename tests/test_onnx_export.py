"""The ONNX path: PyTorch and Keras (tf2onnx) models, gradients equal the frameworks'
autograd, the exported directory serves like a Keras export."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from braincam.preprocessing import Preprocessing
from exporter.errors import ExportError
from exporter.onnx_grad import build_graphs

torch = pytest.importorskip("torch")
from tests.torch_models import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    TinyMobileNetV3,
    TinyResNet,
    TinyVGG,
    export,
)

SIZE = 32
torch.set_num_threads(1)  # tiny models: threads only contend on the shared 2-core runners
LABELS = ["glioma", "meningioma", "notumor", "pituitary"]


def _prep(size: int = SIZE) -> Preprocessing:
    return Preprocessing(height=size, width=size, channels=3, layout="nchw",
                         mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _randomise_batchnorm(model: Any) -> None:
    gen = torch.Generator().manual_seed(1)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_(torch.rand(mod.num_features, generator=gen) - 0.5)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
            mod.weight.data.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
            mod.bias.data.copy_(torch.rand(mod.num_features, generator=gen) - 0.5)


def _train_briefly(model: Any) -> None:
    """A few SGD steps on random data, so the weights are not an initialiser's."""
    gen = torch.Generator().manual_seed(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(5):
        x = torch.randn(8, 3, SIZE, SIZE, generator=gen)
        y = torch.randint(0, 4, (8,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


# model factory, module whose output is the explained feature map, its ONNX name prefix
MODELS = {
    "resnet": (lambda: TinyResNet(), lambda m: m.layer2, "/layer2/"),
    "mobilenetv3": (lambda: TinyMobileNetV3(), lambda m: m.features, "/features/features.7/"),
    "vgg": (lambda: TinyVGG(size=SIZE), lambda m: m.features[7], "/features/features.7/"),
}


def _torch_reference(model: Any, module: Any, x: np.ndarray, classes: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities, and the explained map and its gradient (NHWC) by torch autograd."""
    captured: list[Any] = []
    handle = module.register_forward_hook(lambda mod, inp, out: captured.append(out))
    try:
        logits = model(torch.from_numpy(x))
    finally:
        handle.remove()
    feature = captured[-1]
    score = logits.gather(1, torch.from_numpy(classes)[:, None]).sum()
    (grad,) = torch.autograd.grad(score, feature)
    probs = torch.softmax(logits, 1).detach().numpy()
    return probs, feature.detach().numpy().transpose(0, 2, 3, 1), grad.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("weights", ["random", "trained"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_gradients_equal_torch_autograd(arch: str, weights: str) -> None:
    factory, module_of, prefix = MODELS[arch]
    torch.manual_seed(0)
    model = factory()
    _randomise_batchnorm(model)
    if weights == "trained":
        _train_briefly(model)
    model.eval()
    built = build_graphs(export(model, SIZE), _prep())
    assert built.found.explained.startswith(prefix), built.found.explained
    session = ort.InferenceSession(built.gradcam.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch in (1, 8):
        x = rng.standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32)
        target = np.full(batch, -1, np.int64)
        target[::2] = 3  # explicit targets and the predicted class in one batch
        probs, classes, acts, grads = session.run(None, {"image": x, "target": target})
        assert np.array_equal(classes[::2], target[::2])
        ref_probs, ref_acts, ref_grads = _torch_reference(model, module_of(model), x, classes)
        np.testing.assert_allclose(probs, ref_probs, atol=1e-5)
        assert np.array_equal(classes[1::2], ref_probs[1::2].argmax(1))
        np.testing.assert_allclose(acts, ref_acts, atol=1e-4 * np.abs(ref_acts).max())
        assert np.abs(grads - ref_grads).max() <= 1e-4 * np.abs(ref_grads).max()


def test_a_head_op_without_a_rule_fails_the_export_with_its_name() -> None:
    class SoftplusHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x: Any) -> Any:
            pooled = torch.relu(self.conv(x)).mean(dim=(2, 3))
            return self.fc(torch.nn.functional.softplus(pooled))

    with pytest.raises(ExportError, match=r"no backward rule for op 'Softplus' \(node '/"):
        build_graphs(export(SoftplusHead(), SIZE), _prep())


def test_a_graph_with_a_fixed_batch_fails_with_a_hint(demo_data: Path, tmp_path: Path) -> None:
    from exporter.onnx_export import export_onnx_model

    class FixedBatch(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4 * 30 * 30, 4)

        def forward(self, x: Any) -> Any:
            h = torch.relu(self.conv(x))
            return self.fc(h.view(h.size(0), -1))  # traced with batch 1: a constant

    path = tmp_path / "fixed.onnx"
    buffer = io.BytesIO()
    torch.onnx.export(FixedBatch().eval(), (torch.zeros(1, 3, SIZE, SIZE),), buffer,
                      opset_version=17, dynamo=False)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(ExportError, match="dynamic batch axis"):
        export_onnx_model(path, tmp_path / "out", labels=LABELS,
                          calibration=demo_data / "Testing")
    assert not (tmp_path / "out").exists()


def test_keras_through_tf2onnx_equals_gradient_tape() -> None:
    tf = pytest.importorskip("tensorflow")
    tf2onnx = pytest.importorskip("tf2onnx")
    keras = tf.keras
    keras.utils.set_random_seed(0)
    inp = keras.Input((SIZE, SIZE, 1), name="image_in")
    h = keras.layers.Conv2D(6, 3, padding="same", activation="relu")(inp)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.BatchNormalization()(h)
    last_conv = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="last_conv")
    feat = last_conv(h)
    g = keras.layers.GlobalMaxPooling2D()(feat)  # tf2onnx writes GlobalMaxPool
    g = keras.layers.Dense(16, activation="relu")(g)
    out = keras.layers.Dense(4, activation="softmax")(keras.layers.Dropout(0.3)(g))
    model = keras.Model(inp, out)
    kernel, bias = last_conv.get_weights()
    kernel[..., 0], bias[0] = 0.0, -1.0  # a dead channel: all zeros, every position tied
    last_conv.set_weights([kernel, bias])
    features = keras.Model(inp, feat)
    head = keras.Model(feat, model.layers[-1].input)  # up to the logits' Dense input
    spec = (tf.TensorSpec((None, SIZE, SIZE, 1), tf.float32, name="image_in"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    built = build_graphs(proto, Preprocessing(height=SIZE, width=SIZE, channels=1))
    assert built.found.kind == "softmax"
    session = ort.InferenceSession(built.gradcam.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((8, SIZE, SIZE, 1), dtype=np.float32)
    probs, classes, acts, grads = session.run(None, {"image": x,
                                                     "target": np.full(8, -1, np.int64)})
    np.testing.assert_allclose(probs, model(x).numpy(), atol=1e-5)
    dense = model.layers[-1]
    a = tf.constant(features(x).numpy())
    with tf.GradientTape() as tape:
        tape.watch(a)
        logits = tf.matmul(head(a), dense.kernel) + dense.bias
        score = tf.reduce_sum(tf.gather(logits, classes, axis=1, batch_dims=1))
    ref = tape.gradient(score, a).numpy()
    assert np.all(acts[..., 0] == 0) and np.all(ref[..., 0] != 0)  # TF shares the tie
    np.testing.assert_allclose(acts, a.numpy(), atol=1e-5)
    assert np.abs(grads - ref).max() <= 1e-4 * np.abs(ref).max()


def _train_demo_module() -> Any:
    """examples/train_torch_demo.py, imported from its path (examples/ is no package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "train_torch_demo.py"
    spec = importlib.util.spec_from_file_location("train_torch_demo", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_torch_model_trained_on_the_demo_data_serves_like_torch(demo_data: Path,
                                                                  tmp_path: Path) -> None:
    from braincam.datasets import MULTICLASS_LABELS
    from braincam.decoding import load_image
    from braincam.preprocessing import preprocess
    from exporter.cli import main
    from service.core.config import Settings
    from tests.clients import ready_client

    demo = _train_demo_module()
    model, _ = demo.train(demo_data, size=32, epochs=2, log=False, width=4)
    onnx_path = tmp_path / "torch_demo.onnx"
    demo.export_onnx(model, 32, onnx_path)
    out = tmp_path / "models" / "torch_demo"
    argv = ["--model", str(onnx_path), "--out", str(out), "--labels", ",".join(MULTICLASS_LABELS),
            "--mean", *map(str, IMAGENET_MEAN), "--std", *map(str, IMAGENET_STD),
            "--calibration", str(demo_data / "Testing")]
    assert main(argv) == 0
    assert main([*argv[:-2], "--calibration", str(demo_data / "Testing" / "glioma")]) == 1  # < 16
    settings = Settings(model_dir=out, providers="CPUExecutionProvider")  # type: ignore[call-arg]
    paths = sorted((demo_data / "Testing").rglob("*.png"))[::7][:4]
    with ready_client(settings) as client:
        meta = client.get("/metadata").json()
        assert meta["model"]["labels"] == list(MULTICLASS_LABELS)
        assert meta["model"]["preprocessing"]["layout"] == "nchw"
        for path in paths:
            res = client.post("/predict", files={"file": (path.name, path.read_bytes())})
            assert res.status_code == 200, res.text
            probs = res.json()["probabilities"]
            x = preprocess(load_image(path), demo.preprocessing(32))[None]
            with torch.no_grad():
                expected = torch.softmax(model(torch.from_numpy(x)), 1)[0].numpy()
            np.testing.assert_allclose([probs[k] for k in MULTICLASS_LABELS], expected, atol=1e-5)
            res = client.post("/explain", files={"file": (path.name, path.read_bytes())},
                              data={"method": "gradcam", "smooth": "true"})
            assert res.status_code == 200, res.text
            # Open Inference Protocol: the NCHW tensor as the graph declares it.
            res = client.post(f"/v2/models/{out.name}/infer", json={"inputs": [
                {"name": "image", "shape": list(x.shape), "datatype": "FP32",
                 "data": x.ravel().tolist()}]})
            assert res.status_code == 200, res.text
            # probabilities, and the out-of-distribution score fitted on the calibration images
            outputs = {o["name"]: o for o in res.json()["outputs"]}
            assert set(outputs) == {"probabilities", "ood_score"}
            oip = outputs["probabilities"]
            np.testing.assert_allclose(oip["data"], expected, atol=1e-5)
    # Triton takes the NCHW model as it is: image dims [3, H, W], verified in ORT.
    from exporter import triton

    assert triton.main(["--model-dir", str(out), "--repo", str(tmp_path / "triton")]) == 0
    assert "dims: [ 3, 32, 32 ]" in (tmp_path / "triton" / out.name / "config.pbtxt").read_text()


def test_anatomy_names_tensors_of_both_graphs_and_old_opsets_convert() -> None:
    torch.manual_seed(0)
    model = TinyResNet().eval()
    built = build_graphs(export(model, SIZE), _prep())
    anatomy = built.anatomy
    for graph in (built.classifier.graph, built.gradcam.graph):
        produced = {o for node in graph.node for o in node.output}
        assert {anatomy.logits, anatomy.probabilities, anatomy.pooled_features} <= produced
    assert anatomy.explained in {o for node in built.gradcam.graph.node for o in node.output}
    assert anatomy.pooled_features == "/Flatten_output_0"  # the fc layer's input [N, 16]
    # An opset-13 export is converted to opset 17 and gives the same gradients.
    old = build_graphs(export(model, SIZE, opset=13), _prep())
    x = np.random.default_rng(3).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    feeds = {"image": x, "target": np.array([-1, 2], np.int64)}
    runs = [ort.InferenceSession(b.gradcam.SerializeToString(), providers=["CPUExecutionProvider"])
            .run(["gradients"], feeds)[0] for b in (built, old)]
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-5, atol=1e-7)


class _Head(torch.nn.Module):
    """conv -> relu -> global average pool -> linear, then an output transform."""

    def __init__(self, outputs: int, transform: str) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.fc = torch.nn.Linear(6, outputs)
        self.transform = transform

    def features(self, x: Any) -> Any:
        return torch.relu(self.conv(x))

    def forward(self, x: Any) -> Any:
        z = self.fc(self.features(x).mean(dim=(2, 3)))
        if self.transform == "sigmoid":
            return torch.sigmoid(z)
        e = torch.exp(z)  # a softmax written out: no Softmax node to walk back through
        return e / e.sum(dim=1, keepdim=True)


@pytest.mark.parametrize("transform,outputs,score", [("sigmoid", 1, "logit"),
                                                     ("manual_softmax", 4, "log_probability")])
def test_sigmoid_and_probability_only_outputs(transform: str, outputs: int, score: str) -> None:
    torch.manual_seed(0)
    model = _Head(outputs, transform).eval()
    built = build_graphs(export(model, SIZE), _prep(),
                         outputs="probabilities" if score == "log_probability" else "auto")
    assert (built.found.kind == "probabilities") == (score == "log_probability")
    x = np.random.default_rng(0).standard_normal((4, 3, SIZE, SIZE)).astype(np.float32)
    target = np.array([0, 1, -1, 1], np.int64)
    session = ort.InferenceSession(built.gradcam.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    probs, classes, _, grads = session.run(None, {"image": x, "target": target})
    xt = torch.from_numpy(x)
    feats = model.features(xt)
    z = model.fc(feats.mean(dim=(2, 3)))
    rows = torch.arange(4)
    if transform == "sigmoid":  # 2-way contract: logits [-z/2, z/2], p = [1-σ, σ]
        p = torch.sigmoid(z[:, 0])
        expected = torch.stack([1 - p, p], 1)
        chosen = (torch.from_numpy(classes).float() - 0.5) * z[:, 0]
    else:
        expected = torch.softmax(z, 1)
        chosen = torch.log_softmax(z, 1)[rows, torch.from_numpy(classes)]
    np.testing.assert_allclose(probs, expected.detach().numpy(), atol=1e-6)
    assert list(classes[[0, 1, 3]]) == [0, 1, 1]
    (ref,) = torch.autograd.grad(chosen.sum(), feats)
    ref_nhwc = ref.numpy().transpose(0, 2, 3, 1)
    assert np.abs(grads - ref_nhwc).max() <= 1e-4 * np.abs(ref_nhwc).max()


def test_layer_inside_a_residual_block(demo_data: Path, tmp_path: Path) -> None:
    """--layer on a tensor that is not a cut (a skip path bypasses it): the gradient is
    the partial derivative with the skip path held fixed, as torch autograd gives."""
    from exporter.onnx_export import export_onnx_model

    torch.manual_seed(0)
    model = TinyResNet().eval()
    _randomise_batchnorm(model)
    path = tmp_path / "resnet.onnx"
    export(model, SIZE, path)
    inner = "/layer2/relu/Relu_output_0"  # after conv1-bn1-relu of layer2's block
    result = export_onnx_model(path, tmp_path / "out", labels=LABELS, layer=inner,
                               height=SIZE, width=SIZE, calibration=demo_data / "Testing")
    assert result.spec.parity["passed"] and result.spec.explanation.layer == inner
    built = build_graphs(export(model, SIZE), _prep(), layer=inner)
    x = np.random.default_rng(5).standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    session = ort.InferenceSession(built.gradcam.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    _, classes, _, grads = session.run(None, {"image": x, "target": np.full(3, -1, np.int64)})
    captured: list[Any] = []
    handle = model.layer2.relu.register_forward_hook(lambda m, i, o: captured.append(o))
    logits = model(torch.from_numpy(x))
    handle.remove()
    score = logits.gather(1, torch.from_numpy(classes)[:, None]).sum()
    (ref,) = torch.autograd.grad(score, captured[0])  # the block's first ReLU call
    ref_nhwc = ref.numpy().transpose(0, 2, 3, 1)
    assert np.abs(grads - ref_nhwc).max() <= 1e-4 * np.abs(ref_nhwc).max()


def test_a_wrong_rule_fails_the_gate_and_nothing_is_written(
    demo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from exporter.onnx_export import export_onnx_model
    from exporter.onnx_grad import rules

    torch.manual_seed(0)
    path = tmp_path / "vgg.onnx"
    export(TinyVGG(size=SIZE), SIZE, path)  # its head: Linear -> ReLU -> Linear
    relu = rules.RULES["Relu"]
    monkeypatch.setitem(rules.RULES, "Relu", rules.Rule(lambda em, node, g: [g[0]],
                                                        relu.diff_inputs))
    with pytest.raises(ExportError, match="finite differences"):
        export_onnx_model(path, tmp_path / "out", labels=LABELS,
                          calibration=demo_data / "Testing")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging left


def test_the_onnx_path_needs_no_training_framework(demo_data: Path, tmp_path: Path) -> None:
    """python -m exporter --model x.onnx runs with TensorFlow, Keras, tf2onnx and torch
    unimportable (a fresh interpreter with an import blocker)."""
    import subprocess
    import sys
    import textwrap

    torch.manual_seed(0)
    path = tmp_path / "mobilenet.onnx"
    export(TinyMobileNetV3(), SIZE, path)
    script = textwrap.dedent("""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"tensorflow", "keras", "tf_keras", "tf2onnx", "torch"}:
                    raise ImportError(f"{name} is blocked")
                return None

        sys.meta_path.insert(0, Block())
        from exporter.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    out = tmp_path / "models" / "mobilenet"
    proc = subprocess.run(
        [sys.executable, "-c", script, "--model", str(path), "--out", str(out),
         "--labels", ",".join(LABELS), "--calibration", str(demo_data / "Testing")],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "gradcam.onnx").is_file() and "gate on" in proc.stdout
