"""Vision transformers and ConvNeXt at real size through the ONNX path: export time and
peak memory, the gate's figures, the Grad-CAM graph's cost against the classifier at
batch 1, and /explain served.

    python -m benchmarks.bench_transformers [--models vit_b_16,swin_t,...] [--repeats 30]

Rows (random weights, perturbed so that no head is an initialiser's zeros; no weights
can be downloaded): torchvision's ViT-B/16, Swin-T and ConvNeXt-T and a DeiT-S-shaped
distilled DeiT (tests/torch_models.py: timm's layout, class and distillation tokens)
exported by torch.onnx (opset 17), and Keras 3's ConvNeXtTiny converted by tf2onnx
(exporter.convert), all at 224x224. Each model is written and exported in a subprocess
of its own, so its peak resident memory is the exporter's alone; every model is run one
after the other (a shared machine). Export time is set beside one forward pass of the
classifier over the same images in the same run, the budget's unit.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.bench_realsize import child, explain, forward_seconds

ROOT = Path(__file__).resolve().parents[1]
LABELS = "glioma,meningioma,notumor,pituitary"
SIZE = 224
IMAGENET = ["--mean", "0.485", "0.456", "0.406", "--std", "0.229", "0.224", "0.225"]

# name -> (how the source ONNX is made, exporter flags)
MODELS: dict[str, tuple[str, list[str]]] = {
    "vit_b_16": ("torch", IMAGENET),
    "deit_small_distilled": ("torch", IMAGENET),
    "swin_t": ("torch", IMAGENET),
    "convnext_tiny": ("torch", IMAGENET),
    "keras_convnext_tiny": ("keras", ["--scale", "none"]),
}

_TORCH_SOURCE = """
import sys, torch, torchvision.models as tvm
name, path, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
if name == "deit_small_distilled":  # timm's DeiT-S (distilled) layout, written in tests/
    from tests.torch_models import TinyDeiT
    model = TinyDeiT(size=size, patch=16, dim=384, depth=12, heads=6).eval()
else:
    model = getattr(tvm, name)(num_classes=4).eval()
with torch.no_grad():  # torchvision zero-initialises heads and 1e-6 layer scales
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.02)
torch.onnx.export(model, (torch.zeros(1, 3, size, size),), path, input_names=["input"],
                  output_names=["logits"], opset_version=17, dynamo=False,
                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
"""

_KERAS_SOURCE = """
import sys, onnx, keras, tensorflow as tf
from exporter.convert import to_onnx
path, size = sys.argv[2], int(sys.argv[3])
keras.utils.set_random_seed(0)
model = keras.applications.ConvNeXtTiny(weights=None, input_shape=(size, size, 3), classes=4)
fn = tf.function(lambda x: model(x, training=False),
                 input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32, name="image")])
onnx.save(to_onnx(fn, 17), path)
"""


def bench(name: str, work: Path, calibration: Path, repeats: int) -> dict[str, Any]:
    from benchmarks.bench_onnx_gradcam import _session, time_pair
    from braincam.model_spec import load_spec
    from exporter.model_dir import calibration_inputs

    kind, flags = MODELS[name]
    source = work / f"{name}.onnx"
    script = _TORCH_SOURCE if kind == "torch" else _KERAS_SOURCE
    source_seconds, source_peak, _ = child(["-c", script, name.removeprefix("keras_"),
                                             str(source), str(SIZE)])
    out = work / "models" / name
    seconds, peak, _ = child(["-m", "exporter", "--model", str(source), "--out",
                                      str(out), "--labels", LABELS, *flags,
                                      "--calibration", str(calibration)])
    spec = load_spec(out)
    assert spec.graphs.gradcam is not None, "the export wrote no Grad-CAM graph"
    images = calibration_inputs(calibration, spec.preprocessing)
    forward = forward_seconds(out, images)
    c, g = time_pair(_session(out / spec.graphs.classifier.file, 1),
                     _session(out / spec.graphs.gradcam.file, 1), tuple(spec.input_shape),
                     repeats)
    image = sorted(calibration.rglob("*.png"))[0]
    return {
        "model": name, "source": f"{kind} ({source_seconds:.0f} s, {source_peak} MB)",
        "explained": spec.explanation.layer, "map": spec.explanation.activation_shape,
        "export_s": round(seconds, 1), "forward_s": round(forward, 2),
        "n_images": len(images), "peak_mb": peak, "parity": spec.parity,
        "classifier_ms": round(c, 1), "gradcam_ms": round(g, 1), "ratio": round(g / c, 3),
        "explain": explain(out, image),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | explained (h×w×C) | export s | 1 forward s (n) | budget s | peak MB | "
        "gate fd max rel err | probs max diff | classifier ms | Grad-CAM ms | ratio | "
        "/explain |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["parity"]
        budget = 2 * r["forward_s"] + 60
        lines.append(
            f"| {r['model']} | {'×'.join(map(str, r['map']))} | {r['export_s']} | "
            f"{r['forward_s']} ({r['n_images']}) | {budget:.0f} | {r['peak_mb']} | "
            f"{p.get('gradient_fd_max_rel_err', float('nan')):.2g} | "
            f"{p.get('probabilities_max_abs_diff', float('nan')):.2g} | {r['classifier_ms']} | "
            f"{r['gradcam_ms']} | {r['ratio']:.2f}x | {r['explain']} |")
    return "\n".join(lines)


def main() -> None:
    from benchmarks.machine import machine_info
    from benchmarks.report import save_report

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--calibration", type=Path, help="class folders of images (default: a "
                   "demo dataset built here, 6 per class)")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-transformers-") as tmp:
        work = Path(tmp)
        calibration = args.calibration
        if calibration is None:
            from trainer.demo_data import build_demo_dataset

            build_demo_dataset(work / "demo", per_class=6, test_per_class=6, size=64, seed=0)
            calibration = work / "demo" / "Testing"
        rows = []
        for name in args.models.split(","):
            row = bench(name, work, calibration, args.repeats)
            print(json.dumps(row), flush=True)
            rows.append(row)
    info = machine_info()
    report = "\n".join([
        "# Vision transformers and ConvNeXt through the ONNX path (224x224, random weights)",
        "", "```", json.dumps(info, indent=1), "```", "",
        "Export: `python -m exporter --model x.onnx` in a subprocess (its peak RSS); budget: "
        "2 x one classifier pass over the export's images + 60 s. Ratio: Grad-CAM graph vs "
        "classifier at batch 1, 1 intra-op thread, medians of interleaved runs.", "",
        table(rows), "",
        "Explained tensors: " + "; ".join(f"{r['model']}: `{r['explained']}`" for r in rows),
    ])
    print(report)
    save_report(report, ROOT / "benchmarks" / "results", "-transformers")


if __name__ == "__main__":
    main()
