"""attribution.onnx and the explainers read from it (braincam/explainers.py).

A tiny PyTorch ResNet exported through the ONNX path, then `python -m exporter
attribution`'s `add_attribution` on its directory: the graph's gradients at each layer
and at the image against torch autograd (and, inside the export, float64 finite
differences: a wrong rule fails it), the other files untouched, each method's maps,
the service's 422s, the CLI, and the shipped demo model's attribution graph served.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the `torch` extra")

from clients import ready_client  # noqa: E402
from torch_models import TinyResNet, export  # noqa: E402

from braincam.cam import HiResCAM  # noqa: E402
from braincam.errors import InvalidParameter, MethodUnavailable  # noqa: E402
from braincam.explainers import (  # noqa: E402
    AtLayer,
    FusedLayerCAM,
    IntegratedGradients,
    SmoothGrad,
    black_image,
    cam_layers,
    make_explainer,
)
from braincam.inference import CPU, OnnxModel  # noqa: E402
from braincam.model_spec import ModelSpec, load_spec, sha256_file  # noqa: E402
from braincam.overlay import encode_png  # noqa: E402
from exporter.errors import ExportError  # noqa: E402

SIZE = 32
LABELS = ["glioma", "meningioma", "notumor", "pituitary"]
SHIPPED = Path(__file__).resolve().parents[1] / "models" / "demo"
torch.set_num_threads(1)


def _randomise_batchnorm(model: Any) -> None:
    gen = torch.Generator().manual_seed(1)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_(torch.rand(mod.num_features, generator=gen) - 0.5)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
            mod.weight.data.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
            mod.bias.data.copy_(torch.rand(mod.num_features, generator=gen) - 0.5)


@pytest.fixture(scope="module")
def resnet() -> Any:
    torch.manual_seed(0)
    model = TinyResNet().eval()
    _randomise_batchnorm(model)
    return model


@pytest.fixture(scope="module")
def plain_dir(resnet: Any, demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ResNet exported through the ONNX path: no attribution graph."""
    from exporter.onnx_export import export_onnx_model

    root = tmp_path_factory.mktemp("explainers")
    export(resnet, SIZE, root / "resnet.onnx")
    export_onnx_model(root / "resnet.onnx", root / "plain", labels=LABELS, height=SIZE,
                      width=SIZE, calibration=demo_data / "Testing")
    return root / "plain"


@pytest.fixture(scope="module")
def attributed(plain_dir: Path, demo_data: Path) -> tuple[Path, dict[str, str]]:
    """A copy of it with attribution.onnx added, and the sha256 of its files before."""
    from exporter.attribution_dir import add_attribution

    out = plain_dir.parent / "attributed"
    shutil.copytree(plain_dir, out)
    before = {p.name: sha256_file(p) for p in out.iterdir() if p.suffix in (".onnx", ".bin")}
    add_attribution(out, calibration=demo_data / "Testing")
    return out, before


@pytest.fixture(scope="module")
def model(attributed: tuple[Path, dict[str, str]]) -> OnnxModel:
    return OnnxModel(attributed[0], providers=[CPU])


def _images(n: int, seed: int = 0) -> np.ndarray:
    from torch_models import IMAGENET_MEAN, IMAGENET_STD

    rng = np.random.default_rng(seed)
    x = rng.random((n, 3, SIZE, SIZE), dtype=np.float32)
    mean, std = np.array(IMAGENET_MEAN)[:, None, None], np.array(IMAGENET_STD)[:, None, None]
    return ((x - mean) / std).astype(np.float32)


def test_attribution_is_added_and_nothing_else_changes(
    attributed: tuple[Path, dict[str, str]]
) -> None:
    out, before = attributed
    for name, digest in before.items():
        assert sha256_file(out / name) == digest, name
    spec = load_spec(out)  # verifies every file's sha256, attribution.onnx's too
    assert spec.graphs.attribution is not None and spec.attribution is not None
    names = [la.name for la in spec.attribution.layers]
    assert len(names) == 3 and len(set(names)) == 3
    shapes = [la.activation_shape for la in spec.attribution.layers]
    assert [s[0] for s in shapes] == [16, 8, 4]  # stem, layer1, layer2: one per stage
    gate = spec.attribution.gate
    assert gate["passed"] and gate["image_gradient_fd_max_rel_err"] < 1e-3
    assert all(gate[f"{n}_gradient_fd_max_rel_err"] < 1e-3 for n in names)


def test_gradients_equal_torch_autograd(model: OnnxModel, resnet: Any) -> None:
    assert model.spec.attribution is not None
    names = [la.name for la in model.spec.attribution.layers]
    x = _images(3)
    out = model.attribution(x, None, names, image_gradients=True)
    captured: list[Any] = []
    hooks = [m.register_forward_hook(lambda m, i, o: captured.append(o))
             for m in (resnet.stem[2], resnet.layer1, resnet.layer2)]
    image = torch.from_numpy(x).requires_grad_(True)
    logits = resnet(image)
    for h in hooks:
        h.remove()
    score = logits.gather(1, torch.from_numpy(out.class_index)[:, None]).sum()
    refs = torch.autograd.grad(score, [*captured, image])
    for name, ref in zip(names, refs[:3], strict=True):
        _, grads = out.layers[name]
        ref_nhwc = ref.numpy().transpose(0, 2, 3, 1)
        assert grads.shape == ref_nhwc.shape
        assert np.abs(grads - ref_nhwc).max() <= 1e-4 * np.abs(ref_nhwc).max(), name
    assert out.image_gradients is not None
    ref_image = refs[3].numpy()
    assert np.abs(out.image_gradients - ref_image).max() <= 1e-4 * np.abs(ref_image).max()


def test_a_wrong_rule_fails_the_gate_and_nothing_is_written(
    plain_dir: Path, demo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from exporter.attribution_dir import add_attribution
    from exporter.onnx_grad import rules

    out = tmp_path / "m"
    shutil.copytree(plain_dir, out)
    spec_before = (out / "model.json").read_text()
    relu = rules.RULES["Relu"]
    monkeypatch.setitem(rules.RULES, "Relu", rules.Rule(lambda em, node, g: [g[0]],
                                                        relu.diff_inputs))
    with pytest.raises(ExportError, match="finite differences"):
        add_attribution(out, calibration=demo_data / "Testing")
    assert not (out / "attribution.onnx").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".attribution")]
    assert (out / "model.json").read_text() == spec_before


def test_layers_by_name_and_a_clear_error_for_others(plain_dir: Path) -> None:
    from exporter.attribution_dir import source_of
    from exporter.onnx_grad.attribution import build_attribution

    spec = load_spec(plain_dir)
    built = build_attribution(source_of(plain_dir, spec), spec.preprocessing,
                              ["/layer1/relu_1/Relu_output_0"])
    assert [la.tensor for la in built.layers] == ["/layer1/relu_1/Relu_output_0"]
    with pytest.raises(ExportError, match="names no feature map"):
        build_attribution(source_of(plain_dir, spec), spec.preprocessing, ["nope"])


def test_an_old_model_json_still_loads(tmp_path: Path) -> None:
    """model.json without the attribution entries (every file before this graph)."""
    data = json.loads((SHIPPED / "model.json").read_text())
    data.pop("attribution")
    data["graphs"].pop("attribution")
    old = ModelSpec.model_validate(data)
    assert old.attribution is None and old.graphs.attribution is None
    model_dir = tmp_path / "old"
    model_dir.mkdir()
    for name in ("classifier.onnx", "gradcam.onnx", "weights.bin"):
        shutil.copy(SHIPPED / name, model_dir / name)
    (model_dir / "model.json").write_text(json.dumps(data))
    model = OnnxModel(model_dir, providers=[CPU])
    assert not model.has_attribution and cam_layers(model) == [old.explanation.layer]
    with pytest.raises(MethodUnavailable, match=r"attribution\.onnx"):
        make_explainer("smoothgrad", None, None, model)


def test_each_method_gives_maps_in_0_1(model: OnnxModel) -> None:
    assert model.spec.attribution is not None
    layers = [la.name for la in model.spec.attribution.layers]
    x = _images(2, seed=1)
    targets = np.array([0, 3])
    for explainer in (FusedLayerCAM(layers), AtLayer(HiResCAM(), layers[0]),
                      SmoothGrad(4), IntegratedGradients(4)):
        maps = explainer(model, x, targets)
        assert maps.ndim == 3 and maps.shape[0] == 2, explainer
        assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() == 1.0, explainer
        assert explainer(model, x, targets, size=(40, 30)).shape == (2, 30, 40)
    assert FusedLayerCAM(layers)(model, x, targets).shape[1:] == (16, 16)  # the finest grid
    assert SmoothGrad(2)(model, x, targets).shape[1:] == (SIZE, SIZE)


def test_integrated_gradients_are_complete(model: OnnxModel, resnet: Any) -> None:
    """IG's attributions add up to score(x) - score(black) (Sundararajan et al.'s axiom),
    up to the Riemann sum's error."""
    x = _images(2, seed=2)
    targets = np.array([1, 2])
    total = IntegratedGradients(64).raw(model, x, targets).sum(axis=(1, 2))
    base = black_image(model.spec.preprocessing)[None]
    with torch.no_grad():
        f = resnet(torch.from_numpy(x)).numpy()[np.arange(2), targets]
        f0 = resnet(torch.from_numpy(np.repeat(base, 2, axis=0))).numpy()[np.arange(2), targets]
    assert np.allclose(total, f - f0, rtol=0.05, atol=0.02 * np.abs(f - f0).max())


def test_smoothgrad_without_noise_is_the_gradient(model: OnnxModel, resnet: Any) -> None:
    x = _images(1, seed=3)
    raw = SmoothGrad(1, noise=0.0).raw(model, x, np.array([2]))
    image = torch.from_numpy(x).requires_grad_(True)
    (grad,) = torch.autograd.grad(resnet(image)[0, 2], image)
    expected = np.abs(grad.numpy()).transpose(0, 2, 3, 1).sum(axis=3)
    assert np.abs(raw - expected).max() <= 1e-4 * expected.max()


def test_requests_the_model_cannot_serve_are_422(model: OnnxModel) -> None:
    with pytest.raises(MethodUnavailable, match="not in this model's attribution graph"):
        make_explainer("gradcam", "nope", None, model)
    with pytest.raises(InvalidParameter, match="'layer' does not apply"):
        make_explainer("smoothgrad", cam_layers(model)[1], None, model)
    with pytest.raises(InvalidParameter, match="samples"):
        make_explainer("integrated_gradients", None, 0, model)
    with pytest.raises(InvalidParameter, match="samples"):
        make_explainer("hirescam", cam_layers(model)[1], 4, model)


def _png() -> bytes:
    from hostile_inputs import brain_slice

    return encode_png(brain_slice(64))


def test_service_explains_at_layers_and_pixels(
    attributed: tuple[Path, dict[str, str]], plain_dir: Path
) -> None:
    from service.core.config import Settings

    data = _png()
    with ready_client(Settings(model_dir=attributed[0], providers=[CPU])) as client:
        meta = client.get("/metadata").json()
        assert {"layercam", "smoothgrad", "integrated_gradients"} <= set(meta["cam_methods"])
        layers = meta["cam_layers"]  # the Grad-CAM graph's first, then attribution's
        # layer2's output is the Grad-CAM graph's layer: listed once, by its tensor name
        assert layers == ["/layer2/relu_1/Relu_output_0", "stem.2", "layer1"]
        for form, layer, shape in [
            ({"method": "hirescam", "layer": layers[1]}, layers[1], [16, 16]),
            ({"method": "layercam"}, "stem.2+layer1+layer2", [16, 16]),
            ({"method": "smoothgrad", "samples": "3"}, "image", [SIZE, SIZE]),
            ({"method": "integrated_gradients"}, "image", [SIZE, SIZE]),
            ({"method": "gradcam", "layer": layers[0]}, layers[0], None),
        ]:
            r = client.post("/explain", files={"file": ("x.png", data)},
                            data={**form, "heatmap": "list"})
            assert r.status_code == 200, (form, r.text)
            body = r.json()
            assert body["layer"] == layer and body["method"] == form["method"]
            if shape is not None:
                assert body["cam"]["shape"] == shape
        for form, why in [
            ({"method": "gradcam", "layer": "nope"}, "not in this model's attribution graph"),
            ({"method": "smoothgrad", "samples": "65"}, "samples"),
            ({"method": "smoothgrad", "layer": layers[1]}, "does not apply"),
            ({"method": "gradcam", "samples": "3"}, "samples"),
        ]:
            r = client.post("/explain", files={"file": ("x.png", data)}, data=form)
            assert r.status_code == 422 and why in r.json()["detail"], (form, r.text)
    with ready_client(Settings(model_dir=plain_dir, providers=[CPU])) as client:
        assert client.get("/metadata").json()["cam_layers"] == [load_spec(plain_dir)
                                                                 .explanation.layer]
        for form in ({"method": "smoothgrad"}, {"method": "hirescam", "layer": "other"}):
            r = client.post("/explain", files={"file": ("x.png", data)}, data=form)
            assert r.status_code == 422 and "attribution.onnx" in r.json()["detail"], r.text


def test_cli_explains_with_a_method_and_layer(
    attributed: tuple[Path, dict[str, str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from braincam.cli import main

    image = tmp_path / "in" / "slice.png"
    image.parent.mkdir()
    image.write_bytes(_png())
    model_dir = str(attributed[0])
    layer = cam_layers(OnnxModel(attributed[0], providers=[CPU]))[1]
    for extra in (["--method", "integrated_gradients", "--samples", "2"],
                  ["--method", "hirescam", "--layer", layer]):
        out = tmp_path / extra[1]
        code = main(["predict", str(image.parent), "--model-dir", model_dir, "--explain",
                     str(out), "-q", *extra])
        assert code == 0
        assert len(list(out.rglob("*_overlay.png"))) == 1
    capsys.readouterr()
    code = main(["predict", str(image.parent), "--model-dir", model_dir, "--explain",
                 str(tmp_path / "bad"), "-q", "--method", "gradcam", "--layer", "nope"])
    assert code == 2 and "not in this model's attribution graph" in capsys.readouterr().err


def test_the_demo_models_attribution_graph_is_served() -> None:
    from service.core.config import Settings

    spec = load_spec(SHIPPED)
    assert spec.attribution is not None and spec.attribution.gate["passed"]
    assert [la.name for la in spec.attribution.layers] == ["block2_relu", "block3_relu",
                                                            "block4_relu"]
    image = (SHIPPED.parents[1] / "examples" / "images" / "glioma.png").read_bytes()
    with ready_client(Settings(model_dir=SHIPPED, providers=[CPU])) as client:
        for form, shape in [({"method": "layercam"}, [75, 75]),
                            ({"method": "hirescam", "layer": "block3_relu"}, [37, 37]),
                            ({"method": "smoothgrad", "samples": "2"}, [150, 150])]:
            r = client.post("/explain", files={"file": ("g.png", image)},
                            data={**form, "heatmap": "raw"})
            assert r.status_code == 200, r.text
            assert r.json()["label"] == "glioma" and r.json()["cam"]["shape"] == shape


def test_the_attribution_graph_over_the_open_inference_protocol() -> None:
    from service.core.config import Settings

    with ready_client(Settings(model_dir=SHIPPED, providers=[CPU])) as client:
        meta = client.get("/v2/models/demo-attribution").json()
        assert {o["name"] for o in meta["outputs"]} >= {"image_gradients", "gradients_0"}
        x = np.random.default_rng(0).random((1, 150, 150, 1), dtype=np.float32)
        body = {"inputs": [
            {"name": "image", "shape": [1, 150, 150, 1], "datatype": "FP32",
             "data": x.ravel().tolist()},
            {"name": "target", "shape": [1], "datatype": "INT64", "data": [-1]},
        ], "outputs": [{"name": "image_gradients"}, {"name": "class_index"}]}
        r = client.post("/v2/models/demo-attribution/infer", json=body)
        assert r.status_code == 200, r.text
        outs = {o["name"]: o for o in r.json()["outputs"]}
        assert outs["image_gradients"]["shape"] == [1, 150, 150, 1]
        expected = OnnxModel(SHIPPED, providers=[CPU]).attribution(x, None, (), True)
        assert expected.image_gradients is not None
        got = np.asarray(outs["image_gradients"]["data"], np.float32).reshape(1, 150, 150, 1)
        np.testing.assert_allclose(got, expected.image_gradients, rtol=1e-5, atol=1e-7)
