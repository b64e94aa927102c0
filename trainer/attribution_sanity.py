"""Model-parameter randomisation (Adebayo et al. 2018) for every /explain method of a
model directory, at the ONNX level (no Keras model needed):

    python -m trainer.attribution_sanity --model-dir models/demo --data data/demo [--images 32]

Cascading from the top: the logits layer's weights, then also the dense layer before it,
are replaced by Gaussian noise of the same mean and std inside a copy of weights.bin
(every graph of the directory reads its weights there, so all methods see the same
randomised model). Each method's maps of the same images, explaining the true class,
are compared with the trained model's by Spearman rank correlation (mean over images):
near 0 means the map depends on the learned weights, near 1 that it shows the image.
A first step for the `audit` branch's `braincam audit`, which owns randomisation.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from scipy.stats import spearmanr

from braincam.cam import get_method
from braincam.datasets import scan_split
from braincam.decoding import load_image
from braincam.explainers import PIXEL_METHODS, AtLayer, make_explainer
from braincam.inference import CPU, OnnxModel
from braincam.model_spec import PROBABILITIES_OUTPUT
from braincam.preprocessing import preprocess

# Without @LAYER: the last attribution layer (the demo's block4_relu, Grad-CAM's layer).
METHODS = ("gradcam", "hirescam", "hirescam@block3_relu", "layercam", "smoothgrad",
           "integrated_gradients")


def _maps(model: OnnxModel, x: np.ndarray, targets: np.ndarray, methods: list[str]
          ) -> dict[str, np.ndarray]:
    """Every map from attribution.onnx: gradcam.onnx of a Keras export holds its own
    constant-folded copy of the head's weights (TensorFlow's autodiff of the Dense
    layers), which a randomised weights.bin does not reach; its layer is read from
    attribution.onnx instead (`AtLayer`)."""
    assert model.spec.attribution is not None
    maps = {}
    for entry in methods:
        method, _, layer = entry.partition("@")
        if method in PIXEL_METHODS or (method == "layercam" and not layer):
            maps[entry] = make_explainer(method, None, None, model)(model, x, targets)
        else:
            at = layer or model.spec.attribution.layers[-1].name
            maps[entry] = AtLayer(get_method(method), at)(model, x, targets)
    return maps


def _dense_weights(model_dir: Path) -> list[tuple[str, int, int]]:
    """(name, offset, length) in weights.bin of the 2-D initializers (dense layers), in
    graph order: the last is the logits layer."""
    proto = onnx.load(str(model_dir / "classifier.onnx"), load_external_data=False)
    producer = {o: node for node in proto.graph.node for o in node.output}
    # Only what the class probabilities read (not the out-of-distribution score's).
    needed, stack = set(), [PROBABILITIES_OUTPUT]
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        if name in producer:
            stack.extend(i for i in producer[name].input if i)
    order = {i: n for n, node in enumerate(proto.graph.node) for i in node.input}
    dense = []
    for t in proto.graph.initializer:
        if (t.data_location == onnx.TensorProto.EXTERNAL and len(t.dims) == 2
                and t.name in needed):
            info = {e.key: e.value for e in t.external_data}
            dense.append((order.get(t.name, -1), t.name, int(info.get("offset", 0)),
                          int(info["length"])))
    return [(n, o, length) for _, n, o, length in sorted(dense)]


def randomised_copy(model_dir: Path, out: Path, top: int, seed: int = 0) -> list[str]:
    """A copy of the directory with its `top` last dense layers' weights randomised."""
    shutil.copytree(model_dir, out)
    blob = bytearray((out / "weights.bin").read_bytes())
    rng = np.random.default_rng(seed)
    names = []
    for name, offset, length in _dense_weights(model_dir)[-top:]:
        w = np.frombuffer(bytes(blob[offset:offset + length]), np.float32)
        blob[offset:offset + length] = rng.normal(w.mean(), w.std(), w.size).astype(
            np.float32).tobytes()
        names.append(name)
    (out / "weights.bin").write_bytes(bytes(blob))
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.attribution_sanity")
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--methods", default=",".join(METHODS))
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    model = OnnxModel(args.model_dir, providers=[CPU])
    spec = model.spec
    listing = scan_split(args.data / "Testing", spec.task)
    pick = np.linspace(0, len(listing.paths) - 1, args.images).astype(int)
    x = np.stack([preprocess(load_image(listing.paths[i]), spec.preprocessing) for i in pick])
    targets = np.array([spec.labels.index(listing.classes[i]) for i in pick], np.int64)
    trained = _maps(model, x, targets, methods)
    print(f"{args.images} test images; Spearman rank correlation with the trained model's maps")
    print("| method | " + " | ".join(f"top {k} dense randomised" for k in (1, 2)) + " |")
    print("|---|---|---|")
    rows: dict[str, list[float]] = {m: [] for m in methods}
    for top in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "random"
            randomised_copy(args.model_dir, copy, top)
            rmodel = OnnxModel(copy, providers=[CPU], verify=False)
            random = _maps(rmodel, x, targets, methods)
        for m in methods:
            rho = [spearmanr(a.ravel(), b.ravel()).statistic
                   for a, b in zip(trained[m], random[m], strict=True)]
            rows[m].append(float(np.nanmean(rho)))
    for m in methods:
        print(f"| {m} | " + " | ".join(f"{v:.2f}" for v in rows[m]) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
