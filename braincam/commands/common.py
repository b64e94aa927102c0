"""What several commands share: the model directory option and loading the model."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from braincam.cli import UsageError
from braincam.inference import DEFAULT_PROVIDERS, OnnxModel

MODEL_DIR_ENV = "BRAINCAM_MODEL_DIR"
DEFAULT_MODEL_DIR = Path("models/demo")
# Written by the trainer's model card when the run used the demo-data builder's output.
_SYNTHETIC_MARK = "synthetic demo dataset"


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def default_model_dir() -> Path:
    return Path(os.environ.get(MODEL_DIR_ENV) or DEFAULT_MODEL_DIR)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=default_model_dir(),
        help=f"exported model directory (default: ${MODEL_DIR_ENV} or {DEFAULT_MODEL_DIR})",
    )
    parser.add_argument(
        "--providers",
        default="auto",
        help="ONNX Runtime execution providers in order of preference, comma-separated "
        f"(default: auto, i.e. those of {','.join(DEFAULT_PROVIDERS)} this build has)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: one per core)"
    )


def load_model(args: argparse.Namespace) -> OnnxModel:
    """The model of --model-dir, or a UsageError saying why it cannot be used."""
    model_dir: Path = args.model_dir
    if not (model_dir / "model.json").is_file():
        raise UsageError(
            f"no model.json in {model_dir} (pass --model-dir or set {MODEL_DIR_ENV})"
        )
    if args.providers == "auto":
        import onnxruntime as ort

        available = ort.get_available_providers()
        providers = [p for p in DEFAULT_PROVIDERS if p in available]
    else:
        providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    try:
        # Spinning ORT threads would burn the cores the decoder needs between runs.
        return OnnxModel(
            model_dir, providers, intra_op_threads=args.threads or None, allow_spinning=False
        )
    except Exception as exc:  # a damaged or mismatched model directory
        raise UsageError(f"cannot load the model in {model_dir}: {exc}") from exc


def model_notice(model: OnnxModel) -> str | None:
    """What a reader of this model's answers must know about its training data:
    model.json's `notice` when it has one, else what its model card says."""
    return model.spec.notice or synthetic_data_notice(model.model_dir)


def synthetic_data_notice(model_dir: Path) -> str | None:
    """A warning when the model's card says it was trained on the synthetic demo data."""
    card = model_dir / "MODEL_CARD.md"
    try:
        text = card.read_text(errors="replace")
    except OSError:
        return None
    if _SYNTHETIC_MARK not in text:
        return None
    return (
        "This model was trained on the synthetic demo dataset (generated lesions on a "
        "template brain) and has never seen a real scan: its outputs say nothing about "
        "real MRI."
    )
