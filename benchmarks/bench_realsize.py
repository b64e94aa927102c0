"""Real CNN architectures at real input size within the export budget: export time
against one classifier pass over the images the export uses, peak memory against the
exporter's own estimate and the 4 GiB limit, the gate's figures, the Grad-CAM graph's
cost against the classifier at batch 1, and /explain served.

    python -m benchmarks.bench_realsize [--models resnet50,keras_vgg16_240,...]

Rows (random weights, no downloads): torchvision models exported by torch.onnx (opset
17, dynamic batch; parameters perturbed so that no head is an initialiser's zeros) and
Keras applications (weights=None) converted by tf2onnx (exporter.convert) for the ONNX
path, or saved as .keras for the Keras path (`keras:` rows). Each model is written and
exported in a subprocess of its own (its peak RSS by /usr/bin/time), one after the
other. Budget: peak <= --memory-limit (4 GiB) and export time <= 2 x one classifier
pass over the images used (the gate's and the detector fit's) + 60 s, the pass timed
in the same run at the exporter's batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LABELS = "glioma,meningioma,notumor,pituitary"
IMAGENET = ["--mean", "0.485", "0.456", "0.406", "--std", "0.229", "0.224", "0.225"]
TORCH_FLAGS = ["--scale", "unit", *IMAGENET]

# name -> (writer, architecture, input size, path: onnx|keras, exporter flags)
MODELS: dict[str, tuple[str, str, int, str, list[str]]] = {
    "vgg16_240_tf2onnx": ("keras", "VGG16", 240, "onnx", ["--scale", "unit"]),
    "vgg16_240_keras": ("keras", "VGG16", 240, "keras", ["--scale", "unit"]),
    "resnet50": ("torch", "resnet50", 224, "onnx", TORCH_FLAGS),
    "keras_resnet50": ("keras", "ResNet50", 224, "onnx", ["--scale", "none"]),
    "densenet121": ("torch", "densenet121", 224, "onnx", TORCH_FLAGS),
    "inception_v3": ("torch", "inception_v3", 299, "onnx", TORCH_FLAGS),
    "keras_inception_v3": ("keras", "InceptionV3", 299, "onnx", ["--scale", "symmetric"]),
    "mobilenet_v3_small": ("torch", "mobilenet_v3_small", 224, "onnx", TORCH_FLAGS),
    "mobilenet_v3_large": ("torch", "mobilenet_v3_large", 224, "onnx", TORCH_FLAGS),
    "keras_mobilenet_v3_small": ("keras", "MobileNetV3Small", 224, "onnx", ["--scale", "none"]),
    "keras_efficientnet_v2_b0": ("keras", "EfficientNetV2B0", 224, "onnx", ["--scale", "none"]),
    "keras_efficientnet_v2_b0_keras": ("keras", "EfficientNetV2B0", 224, "keras",
                                       ["--scale", "none"]),
    "resnext50_32x4d": ("torch", "resnext50_32x4d", 224, "onnx", TORCH_FLAGS),
    "regnet_y_400mf": ("torch", "regnet_y_400mf", 224, "onnx", TORCH_FLAGS),
    "keras_densenet121": ("keras", "DenseNet121", 224, "onnx", ["--scale", "none"]),
}

TORCH_SOURCE = """
import sys, torch, torchvision.models as tvm
arch, path, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
extra = {"aux_logits": False, "init_weights": True} if arch == "inception_v3" else {}
model = getattr(tvm, arch)(num_classes=4, **extra).eval()
with torch.no_grad():  # torchvision zero-initialises some heads and gammas
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.02)
torch.onnx.export(model, (torch.zeros(1, 3, size, size),), path, input_names=["input"],
                  output_names=["logits"], opset_version=17, dynamo=False,
                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
"""

# VGG16 as the public brain-MRI fine-tunes build it: the convolutional base, Flatten,
# Dense 256 (ReLU) and a softmax; the others as Keras ships them (classes=4, softmax).
KERAS_SOURCE = """
import sys, onnx, keras, tensorflow as tf
arch, path, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
keras.utils.set_random_seed(0)
if arch == "VGG16":
    base = keras.applications.VGG16(weights=None, include_top=False,
                                    input_shape=(size, size, 3))
    x = keras.layers.Flatten()(base.output)
    x = keras.layers.Dense(256, activation="relu")(x)
    model = keras.Model(base.input, keras.layers.Dense(4, activation="softmax")(x))
else:
    model = getattr(keras.applications, arch)(weights=None, input_shape=(size, size, 3),
                                              classes=4)
if path.endswith(".keras"):
    model.save(path)
else:
    from exporter.convert import to_onnx
    fn = tf.function(lambda x: model(x, training=False), input_signature=[
        tf.TensorSpec((None, size, size, 3), tf.float32, name="image")])
    onnx.save(to_onnx(fn, 17), path)
"""


def child(argv: list[str], timeout: float = 3600) -> tuple[float, int, str]:
    """Run a Python child: (seconds, its peak RSS in MB by /usr/bin/time, output)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        started = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", report.name, sys.executable,
                               *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
        seconds = time.perf_counter() - started
        if proc.returncode:
            raise RuntimeError(f"{argv[:3]} failed ({proc.returncode}):\n"
                               f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        peak_kb = int(report.read().strip().splitlines()[-1])
    return seconds, peak_kb // 1024, proc.stdout + proc.stderr


def write_source(name: str, work: Path) -> tuple[Path, float, int]:
    """The model file a row exports: (path, seconds, peak MB of writing it)."""
    writer, arch, size, path, _ = MODELS[name]
    source = work / f"{name}.{'keras' if path == 'keras' else 'onnx'}"
    script = TORCH_SOURCE if writer == "torch" else KERAS_SOURCE
    seconds, peak, _ = child(["-c", script, arch, str(source), str(size)])
    return source, seconds, peak


def export(name: str, source: Path, out: Path, calibration: Path,
           limit_gib: float = 4.0) -> tuple[float, int, str]:
    """`python -m exporter` on it: (seconds, peak MB, its output)."""
    _, _, size, _, flags = MODELS[name]
    return child(["-m", "exporter", "--model", str(source), "--out", str(out), "--labels",
                  LABELS, "--input-size", str(size), str(size), "--channels", "3", *flags,
                  "--calibration", str(calibration), "--memory-limit", str(limit_gib)])


def images_used(model_dir: Path, calibration: Path) -> np.ndarray:
    """The distinct images the export ran its classifier on: the detector fit's (every
    calibration image, up to its cap), of which the gate's are a part; else the gate's."""
    from braincam.model_spec import load_spec
    from exporter.fit_data import from_folder
    from exporter.model_dir import calibration_inputs

    spec = load_spec(model_dir)
    if spec.ood is None:
        return calibration_inputs(calibration, spec.preprocessing)
    fit = from_folder(calibration, spec.preprocessing, list(spec.labels))
    return np.concatenate([fit.fit_x, fit.held_x])


def forward_seconds(model_dir: Path, images: np.ndarray, batch: int = 16) -> float:
    """One classifier pass over the images (the time budget's unit), 2 threads."""
    import onnxruntime as ort

    from braincam.model_spec import load_spec

    spec = load_spec(model_dir)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(model_dir / spec.graphs.classifier.file), options,
                                   providers=["CPUExecutionProvider"])
    session.run(None, {"image": images[:1]})
    started = time.perf_counter()
    for i in range(0, len(images), batch):
        session.run(None, {"image": images[i:i + batch]})
    return time.perf_counter() - started


def explain(model_dir: Path, image: Path) -> str:
    from service.core.config import Settings
    from tests.clients import ready_client

    settings = Settings(model_dir=model_dir, providers="CPUExecutionProvider")
    with ready_client(settings) as client:
        res = client.post("/explain", files={"file": (image.name, image.read_bytes())},
                          data={"method": "gradcam", "heatmap": "list", "images": "overlay"})
    if res.status_code != 200:
        return f"HTTP {res.status_code}"
    cam = np.asarray(res.json()["cam"]["data"], np.float32)
    return f"200, map {cam.shape[0]}x{cam.shape[1]}" + ("" if cam.max() > cam.min() else " flat")


def bench(name: str, work: Path, calibration: Path, repeats: int) -> dict[str, Any]:
    from benchmarks.bench_onnx_gradcam import _session, time_pair
    from braincam.model_spec import load_spec

    source, source_s, source_mb = write_source(name, work)
    out = work / "models" / name
    seconds, peak, output = export(name, source, out, calibration)
    estimate = re.search(r"memory: ~([\d.]+) GiB at batch (\d+)", output)
    spec = load_spec(out)
    assert spec.graphs.gradcam is not None, "the export wrote no Grad-CAM graph"
    images = images_used(out, calibration)
    forward = forward_seconds(out, images)
    c, g = time_pair(_session(out / spec.graphs.classifier.file, 1),
                     _session(out / spec.graphs.gradcam.file, 1), tuple(spec.input_shape),
                     repeats)
    image = sorted(calibration.rglob("*.png"))[0]
    source.unlink()
    return {
        "model": name, "path": MODELS[name][3], "size": MODELS[name][2],
        "source": f"{MODELS[name][0]} ({source_s:.0f} s, {source_mb} MB)",
        "explained": spec.explanation.layer, "map": spec.explanation.activation_shape,
        "export_s": round(seconds, 1), "forward_s": round(forward, 2), "n_images": len(images),
        "peak_mb": peak,
        "estimate_gib": float(estimate.group(1)) if estimate else None,
        "batch": int(estimate.group(2)) if estimate else None,
        "parity": spec.parity, "ood": spec.ood is not None,
        "classifier_ms": round(c, 1), "gradcam_ms": round(g, 1), "ratio": round(g / c, 3),
        "explain": explain(out, image),
    }


def _figure(parity: dict[str, Any], onnx_key: str, keras_key: str) -> float:
    """The ONNX path's gate figure, else the Keras path's (against TensorFlow)."""
    return float(parity.get(onnx_key, parity.get(keras_key, float("nan"))))


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | path | input | explained (h×w×C) | export s | 1 forward s (n images) | "
        "time budget s | peak MB | estimate GiB (batch) | gate: gradient max rel err | "
        "probs max diff | Grad-CAM / classifier (ms) | /explain |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {MODELS[r['model']][3]} | "
                         f"{MODELS[r['model']][2]} | failed: {r['error']} |||||||||")
            continue
        p = r["parity"]
        budget = 2 * r["forward_s"] + 60
        within = "" if r["export_s"] <= budget else " (over)"
        est = f"{r['estimate_gib']} ({r['batch']})" if r["estimate_gib"] else "-"
        lines.append(
            f"| {r['model']} | {r['path']} | {r['size']} | {'×'.join(map(str, r['map']))} | "
            f"{r['export_s']}{within} | {r['forward_s']} ({r['n_images']}) | {budget:.0f} | "
            f"{r['peak_mb']} | {est} | "
            f"{_figure(p, 'gradient_fd_max_rel_err', 'gradcam_predicted_gradients_rel'):.2g} | "
            f"{_figure(p, 'probabilities_max_abs_diff', 'classifier_probabilities_max_abs'):.2g} | "
            f"{r['ratio']:.2f}x ({r['gradcam_ms']} / {r['classifier_ms']}) | {r['explain']} |")
    return "\n".join(lines)


def main() -> None:
    from benchmarks.machine import machine_info
    from benchmarks.report import save_report

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--calibration", type=Path, help="class folders of images (default: a "
                   "demo test split built here, 20 per class: gate 32, detector 60/20)")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-realsize-") as tmp:
        work = Path(tmp)
        calibration = args.calibration
        if calibration is None:
            from trainer.demo_data import build_demo_dataset

            build_demo_dataset(work / "demo", per_class=1, test_per_class=20, size=128, seed=0)
            calibration = work / "demo" / "Testing"
        for name in args.models.split(","):
            load = os.getloadavg()
            try:
                row = bench(name, work, calibration, args.repeats)
            except (RuntimeError, AssertionError, subprocess.TimeoutExpired) as exc:
                lines = str(exc).strip().splitlines()
                said = [ln for ln in lines if "failed" in ln or "Error" in ln] or lines[-1:]
                row = {"model": name, "error": " / ".join([lines[0], said[-1]])[:400]}
            row["load"] = " ".join(f"{v:.1f}" for v in load)
            print(json.dumps(row), flush=True)
            rows.append(row)
    info = machine_info()
    report = "\n".join([
        "# Real CNN architectures at real input size within the export budget "
        "(random weights)", "", "```", json.dumps(info, indent=1), "```", "",
        "Export: `python -m exporter` in a subprocess (its peak RSS, /usr/bin/time), "
        "--memory-limit 4 GiB; estimate: the exporter's own (exporter/budget.py) and the "
        "batch it chose. Time budget: 2 x one classifier pass over the images the export "
        "used + 60 s. Grad-CAM / classifier: batch 1, 1 intra-op thread, medians of "
        "interleaved runs.", "",
        table(rows), "",
        "Load average (1/5/15 min) before each row: "
        + "; ".join(f"{r['model']}: {r['load']}" for r in rows), "",
        "Explained tensors: " + "; ".join(f"{r['model']}: `{r.get('explained')}`"
                                          for r in rows if "explained" in r),
    ])
    print(report)
    save_report(report, ROOT / "benchmarks" / "results", "-realsize")


if __name__ == "__main__":
    main()
