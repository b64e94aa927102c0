"""`python -m trainer.ood_eval --model-dir DIR --data DIR`: how well the exported
out-of-distribution gate separates the held-out test images from foreign ones.

For the test split (never used by the fit) and each set of `trainer.ood_sets`, the
report gives the share the gate flags at its threshold and the AUROC of the graph's
score, beside two alternatives computed from the same graph's internal tensors: the
energy score and the maximum softmax probability (the baseline the literature beats).
It also reports the calibration on the test split and the latency cost of the
detector (the classifier graph with and without its score, and /predict in-process).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from sklearn.metrics import roc_auc_score

from braincam.calibration import (
    brier_score,
    expected_calibration_error,
    softmax,
)
from braincam.datasets import find_split_dir, scan_split
from braincam.decoding import load_image
from braincam.model_spec import (
    CLASSIFIER_ONNX,
    GRADCAM_ONNX,
    MODEL_JSON,
    OOD_SCORE_OUTPUT,
    ModelSpec,
    load_spec,
    sha256_file,
)
from braincam.ood import energy_score
from braincam.preprocessing import preprocess
from trainer import ood_sets

MAX_TEST = 300  # per transformed-MRI set too: the test split's first images, round-robin


@dataclass
class SetScores:
    name: str
    group: str
    graph: np.ndarray  # the exported detector's score
    energy: np.ndarray
    msp: np.ndarray  # 1 − max softmax probability (calibrated), higher = more unusual


def _classifier_proto(model_dir: Path, spec: ModelSpec) -> onnx.ModelProto:
    return onnx.load(str(model_dir / spec.graphs.classifier.file))  # external weights too


def score_images(
    proto: onnx.ModelProto, spec: ModelSpec, images: list[np.ndarray], name: str, group: str
) -> tuple[SetScores, np.ndarray]:
    from exporter.ood_graph import tensor_values

    x = np.stack([preprocess(img, spec.preprocessing) for img in images])
    assert spec.ood is not None
    score, logits, probs = tensor_values(
        proto, x, [spec.ood.output, spec.ood.logits, "probabilities"]
    )
    scores = SetScores(name, group, score.astype(np.float64), energy_score(logits),
                       1.0 - probs.max(axis=1))
    return scores, logits.astype(np.float64)


def _auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    y = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    return float(roc_auc_score(y, np.r_[inside, outside]))


def _test_scans(data: Path, task: str) -> tuple[list[Path], np.ndarray]:
    """Up to MAX_TEST test images, taken round-robin across the classes."""
    split = scan_split(find_split_dir(data, "Testing"), task)  # type: ignore[arg-type]
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(split.y):
        by_class.setdefault(label, []).append(i)
    longest = max(len(v) for v in by_class.values())
    picked = [v[j] for j in range(longest) for v in by_class.values() if j < len(v)][:MAX_TEST]
    return [split.paths[i] for i in picked], np.asarray([split.y[i] for i in picked])


def _strip_detector(model_dir: Path, out: Path) -> None:
    """A copy of the model directory without the detector (the latency baseline)."""
    from exporter.ood_graph import remove_outputs

    shutil.copytree(model_dir, out)
    spec = json.loads((model_dir / MODEL_JSON).read_text())
    for key, filename in (("classifier", CLASSIFIER_ONNX), ("gradcam", GRADCAM_ONNX)):
        proto = onnx.load(str(out / filename), load_external_data=False)
        remove_outputs(proto, [OOD_SCORE_OUTPUT])
        (out / filename).write_bytes(proto.SerializeToString())
        spec["graphs"][key]["sha256"] = sha256_file(out / filename)
        spec["graphs"][key]["size_bytes"] = (out / filename).stat().st_size
        spec["graphs"][key]["outputs"].pop(OOD_SCORE_OUTPUT, None)
    spec["ood"] = None
    (out / MODEL_JSON).write_text(json.dumps(spec))


def _ort_latency(model_dirs: dict[str, Path], x: np.ndarray, runs: int) -> dict[str, float]:
    """Median ms of one single-image classifier run (one thread), the variants interleaved."""
    import onnxruntime as ort

    # One thread, no spinning: the figure is the graph's own cost, not a race for cores.
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {
        k: ort.InferenceSession(str(d / CLASSIFIER_ONNX), options,
                                providers=["CPUExecutionProvider"])
        for k, d in model_dirs.items()
    }
    outputs = {k: [o.name for o in s.get_outputs()] for k, s in sessions.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for i in range(runs + 20):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(outputs[k], {"image": x})
            if i >= 20:  # warm-up
                times[k].append((time.perf_counter() - t0) * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


def _predict_latency(model_dirs: dict[str, Path], png: bytes, runs: int) -> dict[str, float]:
    """Median ms of /predict (in-process, client-side), the two services interleaved."""
    from fastapi.testclient import TestClient

    from service.core.config import Settings
    from service.main import create_app

    clients = {}
    for key, model_dir in model_dirs.items():
        client = TestClient(create_app(Settings(model_dir=model_dir,
                                                providers="CPUExecutionProvider")))
        client.__enter__()
        if not client.app.state.runtime.wait(120):  # type: ignore[attr-defined]
            raise RuntimeError(f"the model in {model_dir} did not load")
        clients[key] = client
    times: dict[str, list[float]] = {k: [] for k in clients}
    try:
        for i in range(runs + 10):
            for key, client in clients.items():
                t0 = time.perf_counter()
                res = client.post("/predict", files={"file": ("x.png", png, "image/png")})
                if i >= 10:
                    times[key].append((time.perf_counter() - t0) * 1000)
                res.raise_for_status()
    finally:
        for client in clients.values():
            client.__exit__(None, None, None)
    return {k: statistics.median(v) for k, v in times.items()}


def evaluate(model_dir: Path, data: Path, latency_runs: int = 300) -> dict[str, Any]:
    spec = load_spec(model_dir)
    if spec.ood is None:
        raise SystemExit(f"{model_dir} was exported without an out-of-distribution detector")
    proto = _classifier_proto(model_dir, spec)
    h, _, _ = spec.input_shape
    paths, y_test = _test_scans(data, spec.task)
    scans = [load_image(p) for p in paths]
    inside, test_logits = score_images(proto, spec, scans, "held-out test split", "in")
    sets: list[tuple[str, str, list[np.ndarray]]] = [
        ("natural photographs (14 photos × 6 crops)", "far", ood_sets.photographs()),
        ("faces (LFW subset)", "far", ood_sets.faces()),
        ("logo, text, drawings", "far", ood_sets.graphics()),
        ("other medical: fundus, histology, microscopy, CT phantom", "far",
         ood_sets.medical()),
        ("noise (uniform, Gaussian, smoothed)", "far", ood_sets.noise(h)),
        ("flat and ramp images", "far", ood_sets.flat(h)),
    ]
    for name, transform in ood_sets.TRANSFORMS.items():
        sets.append((name, "near", [transform(img, i) for i, img in enumerate(scans)]))
    masks = [ood_sets.brain_mask_for(data, p) for p in paths]
    blanked = ood_sets.no_brain(scans, masks)
    if blanked:
        sets.append(("demo slices with the brain blanked out", "near", blanked))
    results = []
    threshold = spec.ood.threshold
    for name, group, images in sets:
        s, _ = score_images(proto, spec, images, name, group)
        results.append({
            "set": name,
            "group": group,
            "n": len(s.graph),
            "flagged": float(np.mean(s.graph > threshold)),
            "auroc": {
                spec.ood.detector: _auroc(inside.graph, s.graph),
                **({"energy": _auroc(inside.energy, s.energy)} if spec.ood.detector != "energy"
                   else {}),
                "max softmax": _auroc(inside.msp, s.msp),
            },
        })
    t = spec.calibration.temperature if spec.calibration else 1.0
    before, after = softmax(test_logits), softmax(test_logits, t)
    report: dict[str, Any] = {
        "model": f"{spec.name} v{spec.version}",
        "detector": spec.ood.model_dump(mode="json"),
        "in_distribution": {"n": len(inside.graph),
                            "false_alarms": float(np.mean(inside.graph > threshold))},
        "sets": results,
        "calibration_test": {
            "temperature": t, "n": len(y_test),
            "ece_before": expected_calibration_error(before, y_test),
            "ece_after": expected_calibration_error(after, y_test),
            "brier_before": brier_score(before, y_test),
            "brier_after": brier_score(after, y_test),
        },
    }
    if latency_runs:
        from braincam.overlay import encode_png

        with tempfile.TemporaryDirectory() as tmp:
            bare = Path(tmp) / "no_detector"
            _strip_detector(model_dir, bare)
            dirs = {"with": model_dir, "without": bare}
            x = preprocess(scans[0], spec.preprocessing)[None]
            ort_ms = _ort_latency(dirs, x, latency_runs)
            http_ms = _predict_latency(dirs, encode_png(scans[0]), latency_runs // 2)
        report["latency_ms"] = {"classifier_onnx": ort_ms, "predict": http_ms,
                                "runs": latency_runs}
    return report


def _pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def markdown(report: dict[str, Any]) -> str:
    det = report["detector"]
    name = det["detector"]
    others = [k for k in report["sets"][0]["auroc"] if k != name]
    lines = [
        f"# Out-of-distribution report: {report['model']}",
        "",
        f"Detector `{name}` on the graph tensor `{det['features'] or det['logits']}` "
        f"({det['feature_dim']} values), threshold {det['threshold']:.4g} "
        f"({_pct(det['held_out_pass_rate'])} of {det['held_out_size']} held-out images pass; "
        f"fitted on {det['fit_size']}: {det['fit_data']}).",
        "",
        f"**False alarms on the held-out test split: "
        f"{_pct(report['in_distribution']['false_alarms'])}** of "
        f"{report['in_distribution']['n']} images flagged.",
        "",
        f"| set | kind | n | flagged | AUROC {name} | "
        + " | ".join(f"AUROC {k}" for k in others) + " |",
        "|---|---|---:|---:|---:|" + "---:|" * len(others),
    ]
    for r in report["sets"]:
        lines.append(
            f"| {r['set']} | {r['group']} | {r['n']} | {_pct(r['flagged'])} | "
            f"{r['auroc'][name]:.3f} | " + " | ".join(f"{r['auroc'][k]:.3f}" for k in others)
            + " |"
        )
    for group in ("far", "near"):
        rows = [r for r in report["sets"] if r["group"] == group]
        if rows:
            means = {k: float(np.mean([r["auroc"][k] for r in rows])) for k in rows[0]["auroc"]}
            lines.append(f"| *mean, {group}* | | | | {means[name]:.3f} | "
                         + " | ".join(f"{means[k]:.3f}" for k in others) + " |")
    cal = report["calibration_test"]
    lines += [
        "",
        f"Calibration on the test split ({cal['n']} images), temperature "
        f"{cal['temperature']:.3g}: ECE (15 bins) {cal['ece_before']:.4f} → "
        f"{cal['ece_after']:.4f}, Brier {cal['brier_before']:.4f} → {cal['brier_after']:.4f}.",
    ]
    lat = report.get("latency_ms")
    if lat:
        o, p = lat["classifier_onnx"], lat["predict"]
        lines += [
            "",
            f"Latency, median of {lat['runs']} single-image runs (CPU, variants interleaved): "
            f"classifier.onnx {o['without']:.3f} → {o['with']:.3f} ms "
            f"({100 * (o['with'] / o['without'] - 1):+.1f} %); /predict in-process "
            f"{p['without']:.2f} → {p['with']:.2f} ms "
            f"({100 * (p['with'] / p['without'] - 1):+.1f} %).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.ood_eval", description=__doc__)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="dataset with Testing/ (and masks)")
    p.add_argument("--out", type=Path, help="write the Markdown report here (and .json beside)")
    p.add_argument("--latency-runs", type=int, default=300, help="0 skips the latency figures")
    args = p.parse_args(argv)
    report = evaluate(args.model_dir, args.data, args.latency_runs)
    text = markdown(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
