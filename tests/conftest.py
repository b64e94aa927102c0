"""Session-scoped fixtures: one tiny demo dataset, one tiny trained model, one export.

Everything is real (the demo data builder, the trainer, the exporter with its
parity gate) but small, so the whole chain costs seconds.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# PyPI's torch wheel brings Triton (a GPU kernel compiler bundling its own LLVM);
# loaded into a process that already holds TensorFlow (another LLVM), it segfaults
# at import. torch.onnx's exporter probes for it; the tests compile no GPU kernels,
# so torch is told Triton is absent (an import of it raises ImportError).
sys.modules.setdefault("triton", None)

TINY_SIZE = 64


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny demo dataset (12 train / 6 test images per class, 64x64, with masks)."""
    from trainer.demo_data import build_demo_dataset

    root = tmp_path_factory.mktemp("demo_data")
    build_demo_dataset(root, per_class=12, test_per_class=6, size=TINY_SIZE, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_run(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trainer run directory (model.keras, run.json, metrics, plots, model card)."""
    from trainer.train import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = train(
        TrainConfig(
            data=demo_data, out=out, img_size=TINY_SIZE, epochs=2, batch_size=16, seed=0, verbose=0
        )
    )
    return Path(result.run_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(
    tiny_run: Path, demo_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """An exported model directory: classifier.onnx, gradcam.onnx, model.json."""
    from exporter.export import export_model

    out = tmp_path_factory.mktemp("models") / "tiny"
    export_model(tiny_run / "model.keras", out, calibration=demo_data / "Testing")
    return out
