"""How many calibration images the out-of-distribution fit needs: the demo model's
Mahalanobis detector fitted (exporter.fit_data.from_folder's seeded subsample and
stratified 75/25 split) on M of the demo training split, for growing M and several
seeds; its threshold, the share of the untouched test split that passes it (the
figure the threshold promises: 95 %) and the AUROC against images from outside the
distribution (the test images scrambled: pixels shuffled, intensity kept).

    python -m benchmarks.bench_fit_subsample [--data data/demo] [--sizes 100,200,...]

The chosen cap is exporter.fit_data.MAX_IMAGES (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]


def _auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(an outside score > an inside score), ties half."""
    a, b = np.asarray(inside)[:, None], np.asarray(outside)[None, :]
    return float(np.mean((b > a) + 0.5 * (b == a)))


def _split(y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """fit_data.from_folder's stratified 75/25 split, on indices."""
    order = rng.permutation(len(y))
    held = np.concatenate([
        order[y[order] == c][: int(np.round(fit_data_fraction() * np.sum(y == c)))]
        for c in np.unique(y)
    ])
    return np.setdiff1d(np.arange(len(y)), held), np.sort(held)


def fit_data_fraction() -> float:
    from exporter.fit_data import HELD_OUT_FRACTION

    return HELD_OUT_FRACTION


def measure(model_dir: Path, data: Path, sizes: list[int], seeds: list[int]
            ) -> list[dict[str, Any]]:
    """Features of every training image once; then for each M and seed the subsample
    and split fit_data.from_folder draws (a seeded choice of M, stratified 75/25) and
    the fit exporter.ood_fit.fit_trust makes of them."""
    from braincam.model_spec import load_spec
    from braincam.ood import mahalanobis_score
    from exporter import fit_data, ood_graph
    from exporter.ood_fit import fit_trust

    spec = load_spec(model_dir)
    assert spec.ood is not None and spec.ood.features
    proto = onnx.load(str(model_dir / spec.graphs.classifier.file))
    labels = list(spec.labels)
    names = [spec.ood.features, spec.ood.logits]
    default = fit_data.MAX_IMAGES
    fit_data.MAX_IMAGES = 10**9
    try:
        train = fit_data.from_folder(data / "Training", spec.preprocessing, labels)
        test = fit_data.from_folder(data / "Testing", spec.preprocessing, labels)
    finally:
        fit_data.MAX_IMAGES = default
    assert train.fit_y is not None and train.held_y is not None
    x = np.concatenate([train.fit_x, train.held_x])
    y = np.concatenate([train.fit_y, train.held_y])
    feats, logits = ood_graph.tensor_values(proto, x, names)
    feats = feats.reshape(len(feats), -1)
    test_x = np.concatenate([test.fit_x, test.held_x])
    rng = np.random.default_rng(1)
    scrambled = np.stack([rng.permutation(v.reshape(-1)).reshape(v.shape) for v in test_x])
    test_f = ood_graph.tensor_values(proto, test_x, names)[0].reshape(len(test_x), -1)
    out_f = ood_graph.tensor_values(proto, scrambled, names)[0].reshape(len(test_x), -1)
    rows = []
    for m, seed in [(m, seed) for m in sizes for seed in seeds]:
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(len(x), min(m, len(x)), replace=False))
        fit, held = _split(y[chosen], rng)
        fit, held = chosen[fit], chosen[held]
        t = fit_trust(feats[fit], y[fit], feats[held], logits[held], y[held], "", calibrate=False)
        g = t.gaussians
        assert g is not None
        inside = mahalanobis_score(test_f, g.means, g.scale, g.basis)
        outside = mahalanobis_score(out_f, g.means, g.scale, g.basis)
        rows.append({"images": len(chosen), "seed": seed, "fit": len(fit), "held_out": len(held),
                     "threshold": round(t.threshold, 1),
                     "test_pass_rate": round(float(np.mean(inside <= t.threshold)), 4),
                     "auroc_scrambled": round(_auroc(inside, outside), 4)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=ROOT / "models" / "demo")
    p.add_argument("--data", type=Path, help="a demo dataset (default: built here, 300/75 "
                   "per class at 150 px, as make demo)")
    p.add_argument("--sizes", default="100,200,400,800,1200")
    p.add_argument("--seeds", default="0,1,2,3,4", help="subsample and split seeds")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-subsample-") as tmp:
        data = args.data
        if data is None:
            from trainer.demo_data import build_demo_dataset

            data = Path(tmp) / "demo"
            build_demo_dataset(data, per_class=300, test_per_class=75, size=150, seed=0)
        rows = measure(args.model_dir, data, sizes, [int(s) for s in args.seeds.split(",")])
    print("| images (fit / held out) | threshold mean ± sd | test pass rate mean ± sd "
          "(min-max) | AUROC vs scrambled (min) |")
    print("|---|---|---|---|")
    for m in sorted({r["images"] for r in rows}):
        group = [r for r in rows if r["images"] == m]
        t = np.array([r["threshold"] for r in group])
        rate = np.array([r["test_pass_rate"] for r in group])
        r0 = group[0]
        print(f"| {r0['images']} ({r0['fit']} / {r0['held_out']}) | {t.mean():.0f} ± "
              f"{t.std():.0f} | {rate.mean():.1%} ± {rate.std():.1%} ({rate.min():.1%}-"
              f"{rate.max():.1%}) | {min(r['auroc_scrambled'] for r in group):.3f} |")


if __name__ == "__main__":
    main()
