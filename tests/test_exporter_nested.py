"""Transfer-learning models: a keras.applications backbone nested as ONE layer of the
outer model (GAP, Dense, Dropout, Dense logits), saved to `.keras` and reloaded, the
way a user hands one to the exporter. Auto-detection must find the backbone's last
feature map, `--layer <backbone>` means the backbone's output, and an unusable
`--layer` is a clear error (exit code 2), never a traceback. Whole exports of nested
backbones through the parity gate: tests/test_exporter.py, and one below."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("onnxruntime")

from braincam.model_spec import load_spec  # noqa: E402
from exporter.export import export_model  # noqa: E402
from exporter.keras_layers import LayerError, choose_layer, model_logits  # noqa: E402

LABELS4 = ["glioma", "meningioma", "pituitary", "notumor"]

# The families tests/test_exporter.py exports, at the smallest input each accepts.
FAMILIES = {
    "MobileNetV2": 32,
    "EfficientNetB0": 32,
    "ResNet50": 32,
    "Xception": 71,
    "DenseNet121": 32,
}


def _backbone(family: str, size: int, pooling: str | None, list_output: bool) -> keras.Model:
    kwargs = {"alpha": 0.35} if family == "MobileNetV2" else {}
    base = getattr(keras.applications, family)(
        weights=None, include_top=False, input_shape=(size, size, 3), pooling=pooling, **kwargs
    )
    if list_output:  # how Keras 3 may hand a reloaded backbone's output back: [tensor]
        base = keras.Model(base.inputs, [base.outputs[0]], name=f"{base.name}_listed")
    return base


def _saved_and_reloaded(
    tmp_path: Path, family: str, *, pooling: str | None = None, list_output: bool = False,
    logits: bool = True,
) -> tuple[keras.Model, Path, str, str]:
    """(reloaded model, its .keras path, backbone name, backbone's last 4-D layer name)."""
    keras.utils.set_random_seed(0)
    size = FAMILIES[family]
    base = _backbone(family, size, pooling, list_output)
    last_4d = next(
        layer.name for layer in reversed(base.layers) if len(layer.output.shape) == 4
    )
    inputs = keras.Input((size, size, 3))
    x = base(inputs, training=False)
    if isinstance(x, list):
        x = x[0]
    if pooling is None:
        x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(16, activation="relu")(x)
    x = keras.layers.Dropout(0.3)(x)
    outputs = keras.layers.Dense(4, activation=None if logits else "softmax")(x)
    path = tmp_path / f"{family}.keras"
    keras.Model(inputs, outputs).save(path)
    return keras.models.load_model(path, compile=False), path, base.name, last_4d


def _check_split(model: keras.Model, layer: str | None, expected: str) -> None:
    """The explained layer is `expected`; the tapped forward pass records its output and
    gives the model's own outputs (its logits), and the tap is gone afterwards."""
    from exporter.keras_layers import forward

    target = choose_layer(model, layer)
    assert target.layer_name == expected
    assert len(target.activation_shape) == 3
    x = np.random.default_rng(0).uniform(-1, 1, (2, *model.input_shape[1:])).astype(np.float32)
    logits, tap = forward(model, target, x)
    assert tuple(tap.activations.shape) == (2, *target.activation_shape)
    np.testing.assert_allclose(
        np.asarray(logits), np.asarray(model(x, training=False)), rtol=1e-4, atol=1e-5,
    )
    np.testing.assert_allclose(np.asarray(model_logits(model, x)), np.asarray(logits),
                               rtol=1e-5, atol=1e-6)
    assert "call" not in vars(target.layer) and "call" not in vars(target.last)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_nested_backbone_is_found_after_reload(tmp_path: Path, family: str) -> None:
    model, _, backbone, last_4d = _saved_and_reloaded(tmp_path, family)
    _check_split(model, None, last_4d)  # auto-detection descends into the backbone
    _check_split(model, backbone, last_4d)  # the backbone's name means its output


def test_backbone_output_given_back_as_a_list(tmp_path: Path) -> None:
    model, _, backbone, last_4d = _saved_and_reloaded(tmp_path, "MobileNetV2", list_output=True)
    assert isinstance(model.get_layer(backbone).output, list)  # the case Keras 3 produces
    _check_split(model, None, last_4d)
    _check_split(model, backbone, last_4d)


def test_pooled_backbone(tmp_path: Path) -> None:
    # pooling="avg": the backbone's own output is [N,C]; its global pooling joins the head.
    model, _, backbone, last_4d = _saved_and_reloaded(tmp_path, "MobileNetV2", pooling="avg")
    _check_split(model, None, last_4d)
    with pytest.raises(
        LayerError,
        match=rf"'{backbone}' is a nested model with output shape \(None, 1280\), not "
        rf"\[N,h,w,C\] \(a pooled backbone\?\); its last 4-D layer is '{last_4d}'",
    ):
        choose_layer(model, backbone)
    dense = model.layers[-3].name  # Dense(16)
    with pytest.raises(LayerError, match=rf"'{dense}' has output shape \(None, 16\), not"):
        choose_layer(model, dense)
    with pytest.raises(LayerError, match=r"no layer named 'nope'.*4-D output: \.\.\., "):
        choose_layer(model, "nope")  # the long list of names is cut to its last ones
    # Nothing is cut or replayed: a layer with a residual merge after it is explained
    # inside the whole model's own forward pass.
    _check_split(model, "block_14_add", "block_14_add")


def test_export_with_layer_naming_the_backbone(tmp_path: Path, demo_data: Path) -> None:
    # End to end through the parity gate with --layer = the backbone (tests/test_exporter.py
    # exports all families but ResNet50 nested, auto-detected; MobileNetV2 is the cheapest).
    _, path, backbone, last_4d = _saved_and_reloaded(tmp_path, "MobileNetV2", logits=False)
    out = tmp_path / "out"
    export_model(
        path, out, labels=LABELS4, calibration=demo_data / "Testing", channels=3,
        scale="symmetric", layer=backbone,
    )
    spec = load_spec(out)
    assert spec.explanation.layer == last_4d
    assert spec.parity["passed"] and spec.parity["gradcam_predicted_gradients_rel"] <= 1e-4


def test_cli_unusable_layer_is_a_usage_error(tmp_path: Path, demo_data: Path) -> None:
    # A small pooled "backbone" keeps the subprocess cheap.
    inner_in = keras.Input((32, 32, 1))
    feat = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inner_in)
    backbone = keras.Model(inner_in, keras.layers.GlobalAveragePooling2D()(feat), name="bb")
    inputs = keras.Input((32, 32, 1))
    outputs = keras.layers.Dense(4, activation="softmax")(backbone(inputs))
    path = tmp_path / "pooled.keras"
    keras.Model(inputs, outputs).save(path)
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, "-m", "exporter", "--model", str(path), "--out", str(out),
         "--labels", ",".join(LABELS4), "--calibration", str(demo_data / "Testing"),
         "--layer", "bb"],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 2, res.stderr
    assert "'bb' is a nested model with output shape (None, 4)" in res.stderr
    assert "its last 4-D layer is 'conv'" in res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()


def test_export_of_a_layer_before_a_residual_merge(tmp_path: Path, demo_data: Path) -> None:
    # block_14_add feeds both block_15's convolutions and block_15_add: the builder's
    # backward pass sums both paths, and the gate holds it to TensorFlow's tape.
    _, path, _, _ = _saved_and_reloaded(tmp_path, "MobileNetV2", logits=False)
    out = tmp_path / "out"
    export_model(
        path, out, labels=LABELS4, calibration=demo_data / "Testing", channels=3,
        scale="symmetric", layer="block_14_add",
    )
    spec = load_spec(out)
    assert spec.explanation.layer == "block_14_add"
    assert spec.parity["passed"] and spec.parity["gradcam_predicted_gradients_rel"] <= 1e-4
