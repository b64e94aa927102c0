"""The exporter: every supported architecture passes the parity gate; broken exports
and bad inputs fail loudly and leave nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
ort = pytest.importorskip("onnxruntime")

from braincam.model_spec import load_spec  # noqa: E402
from exporter.errors import ExportError  # noqa: E402
from exporter.export import calibration_inputs, export_model  # noqa: E402

LABELS4 = ["glioma", "meningioma", "pituitary", "notumor"]


def _head(x: keras.KerasTensor, units: int, activation: str, flatten: bool) -> keras.KerasTensor:
    x = keras.layers.Flatten()(x) if flatten else keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.3)(x)
    x = keras.layers.Dense(16, activation="relu")(x)
    return keras.layers.Dense(units, activation=activation, name="predictions")(x)


def _application(
    name: str, size: int, nested: bool, units: int, activation: str, flatten: bool
) -> keras.Model:
    kwargs = {"alpha": 0.35} if name == "MobileNetV2" else {}
    base = getattr(keras.applications, name)(
        weights=None, include_top=False, input_shape=(size, size, 3), **kwargs
    )
    if nested:  # the transfer-learning layout: the backbone is one layer of the outer model
        inputs = keras.Input((size, size, 3))
        return keras.Model(inputs, _head(base(inputs), units, activation, flatten))
    return keras.Model(base.inputs, _head(base.output, units, activation, flatten))


def _export_and_check(
    model: keras.Model, tmp_path: Path, calibration: Path, labels: list[str], **kwargs: object
) -> Path:
    model_path = tmp_path / "model.keras"
    model.save(model_path)
    out = tmp_path / "exported"
    export_model(model_path, out, labels=labels, calibration=calibration, **kwargs)  # type: ignore[arg-type]
    spec = load_spec(out)  # also verifies the sha256 of both graphs
    assert spec.parity["passed"] is True
    assert spec.parity["n_inputs"] >= 16
    x = calibration_inputs(calibration, spec.preprocessing, limit=4)
    # Dynamic batch: one image at a time gives the same as the batch.
    sess = ort.InferenceSession(str(out / "classifier.onnx"), providers=["CPUExecutionProvider"])
    batch = sess.run(None, {"image": x})[0]
    single = np.concatenate([sess.run(None, {"image": x[i : i + 1]})[0] for i in range(len(x))])
    np.testing.assert_allclose(batch, single, atol=1e-5)
    np.testing.assert_allclose(batch.sum(axis=1), 1.0, atol=1e-5)
    return out


def test_trainer_model_export(tiny_model_dir: Path, tiny_run: Path) -> None:
    spec = load_spec(tiny_model_dir)
    run = json.loads((tiny_run / "run.json").read_text())
    assert spec.labels == run["labels"]
    assert spec.preprocessing.model_dump() == run["preprocessing"]
    assert spec.explanation.layer == run["explain_layer"]
    assert spec.parity["passed"] and spec.parity["gradcam_predicted_gradients_rel"] <= 1e-4
    g = spec.graphs.gradcam
    assert set(g.inputs) == {"image", "target"}
    assert set(g.outputs) == {
        "probabilities", "class_index", "activations", "gradients", "ood_score"
    }
    assert set(spec.graphs.classifier.outputs) == {"probabilities", "ood_score"}
    assert g.outputs["activations"][1:] == spec.explanation.activation_shape
    assert {"tensorflow", "tf2onnx", "onnx", "onnxruntime"} <= {
        k.replace("-cpu", "") for k in spec.versions
    }


def test_sequential_model_with_logits(tmp_path: Path, demo_data: Path) -> None:
    model = keras.Sequential(
        [
            keras.Input((64, 64, 1)),
            keras.layers.Conv2D(8, 3, activation="relu", name="conv"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(8, 3, activation="relu", name="conv_last"),
            keras.layers.Flatten(),
            keras.layers.Dense(4),
        ]
    )
    out = _export_and_check(model, tmp_path, demo_data / "Testing", LABELS4)
    spec = load_spec(out)
    assert spec.explanation.layer == "conv_last"
    assert spec.source["output_kind"] == "logits"


@pytest.mark.parametrize(
    ("name", "size", "nested", "units", "activation", "flatten"),
    [
        ("MobileNetV2", 32, True, 4, "softmax", False),
        ("EfficientNetB0", 32, True, 4, "linear", False),
        ("ResNet50", 32, False, 1, "sigmoid", True),
        ("Xception", 71, True, 4, "softmax", False),
        ("DenseNet121", 32, True, 4, "softmax", False),
    ],
)
def test_keras_applications(
    tmp_path: Path,
    demo_data: Path,
    name: str,
    size: int,
    nested: bool,
    units: int,
    activation: str,
    flatten: bool,
) -> None:
    keras.utils.set_random_seed(0)
    model = _application(name, size, nested, units, activation, flatten)
    labels = ["notumor", "tumor"] if units == 1 else LABELS4
    out = _export_and_check(
        model, tmp_path, demo_data / "Testing", labels, channels=3, scale="symmetric"
    )
    spec = load_spec(out)
    assert spec.preprocessing.channels == 3 and spec.preprocessing.height == size
    assert len(spec.labels) == len(labels)
    if units == 1:
        assert spec.task == "binary" and spec.decision.positive_label == "tumor"


@pytest.fixture
def small_cnn_path(tmp_path: Path) -> Path:
    inputs = keras.Input((64, 64, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = keras.layers.Activation("relu", name="c1_relu")(x)
    x = keras.layers.MaxPooling2D(name="c1_pool")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(8, activation="relu")(x)
    outputs = keras.layers.Dense(4, activation="softmax")(x)
    path = tmp_path / "small.keras"
    keras.Model(inputs, outputs).save(path)
    return path


def test_wrong_relu_rule_fails_the_parity_gate(
    small_cnn_path: Path, demo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The Grad-CAM graph comes from the ONNX-level builder (exporter/onnx_grad): a
    # gradient passed through a ReLU unmasked must not ship, nor leave staging behind.
    from exporter.onnx_grad import rules

    relu = rules.RULES["Relu"]
    monkeypatch.setitem(rules.RULES, "Relu", rules.Rule(lambda em, node, g: [g[0]],
                                                        relu.diff_inputs))
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"parity gate failed(.|\n)*gradients_rel"):
        export_model(small_cnn_path, out, labels=LABELS4, calibration=demo_data / "Testing",
                     layer="c1_relu")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_wrong_gradient_fails_the_parity_gate(
    small_cnn_path: Path, demo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A plausible but wrong max-pool gradient (spread over the window) must not ship.
    from exporter.onnx_grad import rules

    monkeypatch.setitem(rules.RULES, "MaxPool", rules.RULES["AveragePool"])
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"parity gate failed(.|\n)*gradients_rel"):
        export_model(
            small_cnn_path, out, labels=LABELS4, calibration=demo_data / "Testing", layer="c1_relu"
        )
    assert not out.exists()


def test_explaining_before_max_pool(small_cnn_path: Path, demo_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    export_model(
        small_cnn_path, out, labels=LABELS4, calibration=demo_data / "Testing", layer="c1_relu"
    )
    assert load_spec(out).explanation.activation_shape == [64, 64, 8]


def test_explaining_a_block_before_the_last(demo_data: Path, tmp_path: Path) -> None:
    # Between the explained layer and the head: max pooling, a 'same' conv, BatchNorm,
    # ReLU and a 'valid' conv with a built-in ReLU, all through the ONNX-level builder's
    # rules (tf2onnx cannot convert TensorFlow's gradient ops).
    out = _export_and_check(_two_block_cnn(), tmp_path, demo_data / "Testing", LABELS4,
                            layer="c1_relu")
    spec = load_spec(out)
    assert spec.explanation.activation_shape == [64, 64, 8]
    assert spec.parity["gradcam_predicted_gradients_rel"] <= 1e-4


def test_global_max_pooling_shares_the_gradient_of_tied_maxima(
    demo_data: Path, tmp_path: Path
) -> None:
    # Channel 0 of the explained layer is dead (ReLU of a negative constant), so its
    # maximum, 0, is tied at every position and TensorFlow shares the gradient among
    # them all, not just the first.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64, 64, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = keras.layers.ReLU(name="c1_relu")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", name="c2")(x)
    x = keras.layers.ReLU(name="c2_relu")(x)
    x = keras.layers.GlobalMaxPooling2D()(x)
    outputs = keras.layers.Dense(4, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    c2 = model.get_layer("c2")
    kernel, bias = c2.get_weights()
    kernel[..., 0], bias[0] = 0.0, -1.0
    c2.set_weights([kernel, bias])
    out = _export_and_check(model, tmp_path, demo_data / "Testing", LABELS4, layer="c2_relu")
    assert load_spec(out).parity["gradcam_predicted_gradients_rel"] <= 1e-4


def test_wrong_conv_gradient_fails_the_parity_gate(
    demo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The transposed convolution with the kernel not flipped back: a classic mistake.
    from exporter.onnx_grad import rules

    conv = rules.RULES["Conv"]

    def unflipped(em, node, g):
        flipped = em.node("Slice", [node.input[1], em.ints([-1, -1]),
                                    em.ints([-(2**62), -(2**62)]), em.ints([2, 3]),
                                    em.ints([-1, -1])])
        renamed = type(node)()
        renamed.CopyFrom(node)
        renamed.input[1] = flipped
        return conv.fn(em, renamed, g)

    monkeypatch.setitem(rules.RULES, "Conv", rules.Rule(unflipped, conv.diff_inputs))
    path = tmp_path / "model.keras"
    _two_block_cnn().save(path)
    with pytest.raises(ExportError, match="parity gate failed"):
        export_model(path, tmp_path / "out", labels=LABELS4, calibration=demo_data / "Testing",
                      layer="c1_relu")


def _two_block_cnn() -> keras.Model:
    inputs = keras.Input((64, 64, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = keras.layers.Activation("relu", name="c1_relu")(x)
    x = keras.layers.MaxPooling2D(name="c1_pool")(x)
    x = keras.layers.Conv2D(12, 3, padding="same", name="c2")(x)
    x = keras.layers.BatchNormalization(name="c2_bn")(x)
    x = keras.layers.ReLU(name="c2_relu")(x)
    x = keras.layers.Conv2D(16, 5, padding="valid", activation="relu", name="c3")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(4, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    bn = model.get_layer("c2_bn")  # non-trivial inference statistics
    rng = np.random.default_rng(0)
    bn.set_weights([rng.uniform(0.5, 2, 12), rng.normal(0, 0.1, 12), rng.normal(0, 0.1, 12),
                    rng.uniform(0.5, 2, 12)])
    return model


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_exports(small_cnn_path: Path, demo_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    res = _cli(
        "--model",
        str(small_cnn_path),
        "--out",
        str(out),
        "--labels",
        ",".join(LABELS4),
        "--calibration",
        str(demo_data / "Testing"),
    )
    assert res.returncode == 0, res.stderr
    assert "parity on" in res.stdout
    assert load_spec(out).name == "cli"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "does not exist"),
        ("not_keras", "not a Keras model"),
        ("bad_layer", "no layer named"),
        ("no_conv", "no layer with a 4-D output"),
        ("label_count", "labels given but the model has 4 classes"),
    ],
)
def test_bad_inputs_give_clear_errors(
    case: str, message: str, small_cnn_path: Path, demo_data: Path, tmp_path: Path
) -> None:
    model, labels, extra = str(small_cnn_path), ",".join(LABELS4), []
    if case == "missing":
        model = str(tmp_path / "nope.keras")
    elif case == "not_keras":
        (tmp_path / "junk.keras").write_text("not a model")
        model = str(tmp_path / "junk.keras")
    elif case == "bad_layer":
        extra = ["--layer", "does_not_exist"]
    elif case == "no_conv":
        mlp = keras.Sequential(
            [
                keras.Input((64, 64, 1)),
                keras.layers.Flatten(),
                keras.layers.Dense(4, activation="softmax"),
            ]
        )
        mlp.save(tmp_path / "mlp.keras")
        model = str(tmp_path / "mlp.keras")
    elif case == "label_count":
        labels = "a,b"
    out = tmp_path / "out"
    res = _cli(
        "--model",
        model,
        "--out",
        str(out),
        "--labels",
        labels,
        "--calibration",
        str(demo_data / "Testing"),
        *extra,
    )
    assert res.returncode != 0
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()


def test_pooled_features_before_a_softmax_layer(demo_data: Path, tmp_path: Path) -> None:
    # --ood-features pooled: the detector reads the output Dense's input, found by the
    # builder in the ONNX graph and tapped on the Keras side for the parity gate, also
    # when a separate Softmax layer follows that Dense.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64, 64, 1))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(6, activation="relu", name="penultimate")(x)
    x = keras.layers.Dense(4, name="scores")(x)
    model = keras.Model(inputs, keras.layers.Softmax(name="softmax")(x))
    out = _export_and_check(model, tmp_path, demo_data / "Testing", LABELS4,
                            ood_features="pooled")
    spec = load_spec(out)
    assert spec.source["output_kind"] == "softmax"
    assert spec.ood is not None and spec.ood.features != "grid_features"
    assert spec.ood.feature_dim == 6
    assert spec.parity["classifier_ood_rel"] <= 1e-3
