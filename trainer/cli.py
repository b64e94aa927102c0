"""`python -m trainer --data DIR --out runs/NAME [...]`: train, evaluate, optionally export."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from braincam.errors import InputError
from trainer.errors import ConfigError, WeightsError

if TYPE_CHECKING:
    from trainer.train import TrainResult

# Kept in sync with trainer.model / trainer.train, which import TensorFlow: the CLI
# parses (and answers --help) before paying for that import.
ARCHS = ("cnn", "EfficientNetB0", "ResNet50", "MobileNetV2", "Xception", "DenseNet121")
CNN_HEADS = ("gap", "max", "flatten")
DEFAULT_CNN_HEAD = "max"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m trainer",
        description="Train a brain-MRI classifier on a Kaggle-layout dataset "
        "(DIR/Training/<class>/, DIR/Testing/<class>/) and write runs/NAME/ "
        "(model.keras, run.json, metrics.json, plots, MODEL_CARD.md).",
    )
    p.add_argument("--data", required=True, type=Path, help="dataset root (Kaggle layout)")
    p.add_argument("--out", required=True, type=Path, help="run directory, e.g. runs/NAME")
    p.add_argument("--task", choices=("multiclass", "binary"), default="multiclass",
                   help="4 classes, or notumor vs tumor with a tuned threshold")
    p.add_argument("--arch", choices=ARCHS, default="cnn",
                   help="the small CNN (default) or a keras.applications backbone")
    p.add_argument("--weights", type=Path,
                   help="local weights file (.keras, .weights.h5, legacy .h5); never downloaded")
    p.add_argument("--img-size", type=int, default=150, help="square input size (default 150)")
    p.add_argument("--channels", type=int, choices=(1, 3),
                   help="input channels (default: 1 for cnn, 3 for backbones)")
    p.add_argument("--epochs", type=int, help="maximum epochs; early stopping ends sooner "
                   "(default 30)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-split", type=float, default=0.15,
                   help="fraction of Training/ held out for validation (stratified)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--cnn-head", choices=CNN_HEADS, default=DEFAULT_CNN_HEAD,
                   help=f"the CNN's pooling before the dense head (default {DEFAULT_CNN_HEAD})")
    p.add_argument("--export", type=Path, metavar="MODEL_DIR",
                   help="also export to ONNX (classifier + Grad-CAM graphs, model.json)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-epoch progress")
    return p.parse_args(argv)


def summary(result: TrainResult) -> None:
    """A table of the headline numbers and where every artefact is."""
    from rich.console import Console
    from rich.table import Table

    m = result.metrics
    table = Table(title=f"braincam run {result.run_dir.name}", show_header=False,
                  title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("test accuracy", f"{m['accuracy']:.4f}  ({m['test_size']} images)")
    table.add_row("macro F1", f"{m['macro_f1']:.4f}")
    auc = m["roc_auc"]["macro"]
    table.add_row("macro ROC AUC", "n/a" if auc is None else f"{auc:.4f}")
    if m["task"] == "binary":
        table.add_row("threshold p(tumor)", f"{m['threshold']:.4f} (Youden's J on validation)")
        sens, spec = (m[k] for k in ("sensitivity", "specificity"))
        table.add_row("sensitivity / specificity",
                      " / ".join("n/a" if v is None else f"{v:.4f}" for v in (sens, spec)))
    table.add_row("best epoch", f"{m['best_epoch']} of {m['epochs_run']}")
    table.add_row("training time", f"{m['training_time_seconds']:.1f} s "
                  f"(total {result.seconds:.1f} s)")
    for key, path in result.artefacts.items():
        table.add_row(key.replace("_", " "), str(path))
    Console().print(table)


def export_errors() -> tuple[type[Exception], ...]:
    """The exporter's own, clearly worded failures (none if it is not installed)."""
    try:
        from exporter.errors import ExportError
    except ImportError:
        return ()
    return (ExportError,)


def quiet_logging(fmt: str) -> None:
    """Our INFO lines, and only errors from TensorFlow and its converters.

    Call before TensorFlow is imported: its C++ logging reads the variable once.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format=fmt)
    for noisy in ("absl", "tensorflow", "h5py", "tf2onnx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logging("%(message)s")
    from trainer.train import DEFAULT_EPOCHS, TrainConfig, train

    config = TrainConfig(
        data=args.data, out=args.out, task=args.task, arch=args.arch, weights=args.weights,
        img_size=args.img_size, channels=args.channels,
        epochs=args.epochs if args.epochs is not None else DEFAULT_EPOCHS,
        batch_size=args.batch_size, seed=args.seed, val_split=args.val_split,
        learning_rate=args.lr, export=args.export, cnn_head=args.cnn_head,
        # A live progress bar on a terminal; one line per epoch in logs and builds.
        verbose=0 if args.quiet else (1 if sys.stdout.isatty() else 2),
    )
    try:
        result = train(config)
    except (InputError, ConfigError, WeightsError) as exc:
        # DatasetError (missing/empty data, empty class folder) is an InputError.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except export_errors() as exc:
        print(f"error: export failed (the run directory {args.out} is complete): {exc}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    summary(result)
    return 0
