"""Train a small PyTorch CNN on the demo data and export it to ONNX (then braincam's
exporter builds its Grad-CAM graph: see the README, "Bringing your own ONNX model").

    python examples/train_torch_demo.py --data data/demo --out runs/torch_demo.onnx
    python -m exporter --model runs/torch_demo.onnx --out models/torch_demo \\
        --labels glioma,meningioma,pituitary,notumor \\
        --mean 0.485 0.456 0.406 --std 0.229 0.224 0.225 --calibration data/demo/Testing

Images go through braincam's own `preprocess` (3 channels, x/255, ImageNet mean/std,
NCHW), so the served model sees exactly its training inputs.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's braincam

from braincam.datasets import MULTICLASS_LABELS, load_dataset_split
from braincam.preprocessing import Preprocessing

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class DemoNet(nn.Module):
    """Four conv blocks with max pooling, global average pooling, a linear head."""

    def __init__(self, classes: int = 4, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            block(3, width), nn.MaxPool2d(2), block(width, 2 * width), nn.MaxPool2d(2),
            block(2 * width, 4 * width), nn.MaxPool2d(2), block(4 * width, 4 * width),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
                                  nn.Linear(4 * width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def preprocessing(size: int) -> Preprocessing:
    return Preprocessing(height=size, width=size, channels=3, layout="nchw",
                         mean=IMAGENET_MEAN, std=IMAGENET_STD)


def train(data: Path, size: int = 64, epochs: int = 8, seed: int = 0,
          log: bool = True, width: int = 16) -> tuple[DemoNet, float]:
    """The model and its test accuracy."""
    torch.manual_seed(seed)
    prep = preprocessing(size)
    training = load_dataset_split(data, "Training", prep)
    testing = load_dataset_split(data, "Testing", prep)
    x, y = torch.from_numpy(training.x), torch.from_numpy(np.asarray(training.y, np.int64))
    model = DemoNet(len(training.labels), width)  # outputs in training.labels' order
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), 32):
            idx = order[i:i + 32]
            batch = x[idx]
            flip = torch.rand(len(idx)) < 0.5  # left-right flips: brains are near-symmetric
            batch[flip] = batch[flip].flip(3)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(batch), y[idx])
            loss.backward()
            opt.step()
        if log:
            print(f"epoch {epoch + 1}/{epochs} loss {loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(testing.x)).argmax(1).numpy()
    return model, float((pred == np.asarray(testing.y)).mean())


def export_onnx(model: nn.Module, size: int, path: Path) -> None:
    buffer = io.BytesIO()
    torch.onnx.export(model.eval(), (torch.zeros(1, 3, size, size),), buffer,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(onnx.load_from_string(buffer.getvalue()), str(path))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/demo"))
    p.add_argument("--out", type=Path, default=Path("runs/torch_demo.onnx"))
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    model, accuracy = train(args.data, args.size, args.epochs, args.seed)
    export_onnx(model, args.size, args.out)
    seconds = time.perf_counter() - started
    print(f"test accuracy {accuracy:.3f}; wrote {args.out} in {seconds:.0f} s; "
          f"labels in output order: {','.join(MULTICLASS_LABELS)}")


if __name__ == "__main__":
    main()
