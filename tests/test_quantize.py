"""INT8 quantisation of an exported model directory (exporter/quantize.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from braincam.inference import OnnxModel
from braincam.model_spec import load_spec
from exporter.cli import main as exporter_main
from exporter.model_dir import calibration_inputs
from exporter.quantize import QuantizationError, quantize_model_dir

CPU = "CPUExecutionProvider"


@pytest.fixture(scope="module")
def int8_dir(tiny_model_dir: Path, demo_data: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> Path:
    out = tmp_path_factory.mktemp("int8") / "tiny-int8"
    # The tiny model trained 2 epochs: a small margin between classes, so its gate is
    # 90 % here; the real models pass the default 99 %.
    quantize_model_dir(tiny_model_dir, demo_data / "Testing", out_dir=out, min_agreement=0.9)
    return out


def test_int8_classifier_is_recorded_and_served(
    int8_dir: Path, tiny_model_dir: Path, demo_data: Path
) -> None:
    float_spec, spec = load_spec(tiny_model_dir), load_spec(int8_dir)  # sha256s verified
    q = spec.quantization
    assert q is not None and float_spec.quantization is None
    assert q.classifier == "int8" and q.calibration_images == 24  # every demo test image
    assert q.float_classifier_sha256 == float_spec.graphs.classifier.sha256
    assert spec.graphs.classifier.sha256 != float_spec.graphs.classifier.sha256
    assert spec.graphs.gradcam == float_spec.graphs.gradcam  # Grad-CAM stays float
    assert "float32" in q.gradcam
    # A model with an out-of-distribution gate is also gated on its flags.
    assert (q.ood_flag_agreement is None) == (float_spec.ood is None)

    import onnx

    ops = {n.op_type for n in onnx.load(str(int8_dir / "classifier.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format

    x = calibration_inputs(demo_data / "Testing", spec.preprocessing)
    ref = OnnxModel(tiny_model_dir, providers=[CPU]).predict(x)
    got = OnnxModel(int8_dir, providers=[CPU]).predict(x)
    assert np.abs(ref - got).max() == pytest.approx(q.max_probability_diff, abs=1e-5)
    assert np.mean(ref.argmax(1) == got.argmax(1)) == pytest.approx(q.top1_agreement)
    assert q.top1_agreement >= 0.9


def test_gate_failure_writes_nothing(tiny_model_dir: Path, demo_data: Path, tmp_path: Path
                                     ) -> None:
    out = tmp_path / "never"
    with pytest.raises(QuantizationError, match="gate failed"):
        quantize_model_dir(tiny_model_dir, demo_data / "Testing", out_dir=out, min_agreement=1.01)
    assert not out.exists() and not list(tmp_path.iterdir())  # no staging left behind


def test_cli_quantizes_in_place_once(int8_dir: Path, tiny_model_dir: Path, demo_data: Path,
                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir, copy)
    args = ["quantize", "--model-dir", str(copy), "--calibration", str(demo_data / "Testing"),
            "--min-agreement", "0.9", "--reduce-range"]
    assert exporter_main(args) == 0
    assert "top-1 agreement" in capsys.readouterr().out
    q = load_spec(copy).quantization
    assert q is not None and q.reduce_range is True
    assert exporter_main(args) == 1  # already quantised: refused, the directory kept
    assert "already quantised" in capsys.readouterr().err
    assert load_spec(copy).quantization == q
    missing = ["quantize", "--model-dir", str(copy), "--calibration", str(tmp_path / "none")]
    assert exporter_main(missing) == 1
