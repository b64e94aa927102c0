"""The audit of one model over a set of images: every figure, per image and method.

Images are found and decoded as `braincam predict` finds and decodes them
(braincam/batch.py, braincam/pipeline.py: same formats, budgets and preprocessing;
a volume contributes its middle slice). Each image is explained for the class the
model decides (no labels are needed); the figures:

- faithfulness (faithfulness.py): ROAD and blur deletion/insertion AUCs, beside a
  random order and a uniform map, and whether the decision flips when the map's top
  20 % is removed;
- where the heat lies (heat.py): shares outside the head and on its rim;
- stability (stability.py): rank correlation under a mirror and under noise;
- on demo data, where the demo builder's masks sit beside the images
  (braincam/demo_masks.py): the localisation figures trainer.explain_eval reports;
- the cascading randomisation test (randomisation.py) on a few evenly spread images.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from braincam.audit.faithfulness import REFERENCES, FaithfulnessSettings, image_faithfulness
from braincam.audit.heat import heat_figures
from braincam.audit.maps import Explainer
from braincam.audit.randomisation import randomisation_test
from braincam.audit.stability import NOISE_LEVEL, stability
from braincam.batch import find_inputs, read_bounded
from braincam.cam import resize_cam
from braincam.decision import decide
from braincam.decoding import DEFAULT_MAX_PIXELS, open_image
from braincam.demo_masks import find_demo_masks, load_mask, mask_scores
from braincam.errors import InputError
from braincam.inference import OnnxModel
from braincam.model_spec import PROBABILITIES_OUTPUT
from braincam.occlusion import OCCLUSION
from braincam.pipeline import input_errors, prepare_slice

log = logging.getLogger(__name__)

Progress = Callable[[str, int], None]  # (stage, items just done)


@dataclass(frozen=True)
class AuditSettings:
    methods: tuple[str, ...]
    faithfulness: FaithfulnessSettings = field(default_factory=FaithfulnessSettings)
    sanity_images: int = 16  # images the randomisation test explains again per step
    stability: bool = True
    noise_level: float = NOISE_LEVEL
    seed: int = 0
    limit: int | None = None  # at most this many images (evenly spread over the list)
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class AuditImage:
    path: str
    slice: int | None
    pixels: np.ndarray  # the decoded slice (what the overlay is drawn on)
    x: np.ndarray  # [H,W,C] model input
    probabilities: np.ndarray | None = None
    target: int = -1


@dataclass
class Loaded:
    images: list[AuditImage]
    skipped: list[dict[str, str]]


def load_images(
    paths: Sequence[Path], model: OnnxModel, recursive: bool, exclude: Sequence[Path],
    max_pixels: int = DEFAULT_MAX_PIXELS, limit: int | None = None,
) -> Loaded:
    """Decode and preprocess every file under `paths` (unreadable ones listed with
    their reason); with `limit`, that many files evenly spread over the sorted list."""
    discovery = find_inputs(paths, recursive=recursive, exclude=exclude)
    files = discovery.files
    if limit is not None and len(files) > limit:
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]
    skipped = [{"path": str(p), "error": "not_found: no such file or directory"}
               for p in discovery.missing]
    images: list[AuditImage] = []
    explainer = Explainer(model, [])
    for f in files:
        try:
            data = read_bounded(f.path)
            with input_errors():
                opened = open_image(data, max_pixels=max_pixels)
            prepared = prepare_slice(opened, None, model.spec)
        except InputError as exc:
            skipped.append({"path": str(f.path), "error": f"{exc.code}: {exc.detail}"})
            continue
        except OSError as exc:
            skipped.append({"path": str(f.path),
                            "error": f"unreadable_file: {exc.strerror or exc}"})
            continue
        decoded = prepared.decoded
        images.append(AuditImage(str(f.path), decoded.slice_index, decoded.pixels,
                                 explainer.to_hwc(prepared.batch)[0]))
    return Loaded(images, skipped)


def _clean(value: Any) -> Any:
    """NaN -> None, numpy scalars -> Python: JSON has neither."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def audit(
    model: OnnxModel,
    images: list[AuditImage],
    settings: AuditSettings,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Every figure of the audit: {"images": [...], "randomisation": {...}, ...}."""
    tick = progress or (lambda stage, n: None)
    spec = model.spec
    methods = list(settings.methods)
    explainer = Explainer(model, methods)
    if not images:
        return {"images": [], "randomisation": {m: [] for m in methods}}
    x = np.stack([im.x for im in images])
    probs = explainer.predict(x)
    for im, p in zip(images, probs, strict=True):
        im.probabilities = p
        im.target = decide(p, spec).class_index
    targets = np.array([im.target for im in images], dtype=np.int64)

    def decide_index(p: np.ndarray) -> int:
        return decide(p, spec).class_index

    records: list[dict[str, Any]] = []
    rng = np.random.default_rng(settings.seed)
    all_maps: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    for i, im in enumerate(images):
        maps = {m: v[0] for m, v in explainer.maps(x[i : i + 1], targets[i : i + 1]).items()}
        for m in methods:
            all_maps[m].append(maps[m])
        faith = image_faithfulness(
            explainer.predict, im.x, maps, im.target, settings.faithfulness,
            np.random.default_rng([settings.seed, i]), decide_index,
        )
        h, w = im.pixels.shape[:2]
        at_image = {m: resize_cam(v, (w, h)) for m, v in maps.items()}
        heat = heat_figures(im.pixels, at_image)
        demo = _demo_mask_figures(Path(im.path), im.pixels, at_image)
        decision = decide(probs[i], spec)
        records.append({
            "path": im.path,
            "slice": im.slice,
            "label": decision.label,
            "confidence": decision.confidence,
            "probabilities": decision.probabilities,
            "demo_masks": demo is not None,
            "methods": {
                m: {**heat[m], **faith[m], **(demo[m] if demo else {})} for m in methods
            },
            "references": {r: faith[r] for r in REFERENCES},
        })
        tick("faithfulness", 1)
    if settings.stability:
        def maps_fn(imgs: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
            return explainer.maps(imgs, t)

        for i in range(len(images)):
            original = {m: all_maps[m][i][None] for m in methods}
            res = stability(maps_fn, x[i : i + 1], targets[i : i + 1], original, rng,
                            settings.noise_level)
            for m in methods:
                records[i]["methods"][m]["flip_spearman"] = res[m]["flip"][0]
                records[i]["methods"][m]["noise_spearman"] = res[m]["noise"][0]
            tick("stability", 1)
    randomisation = randomise(model, explainer, x, targets, settings, tick)
    return _clean({"images": records, "randomisation": randomisation})


def _demo_mask_figures(
    path: Path, pixels: np.ndarray, maps: dict[str, np.ndarray]
) -> dict[str, dict[str, float]] | None:
    found = find_demo_masks(path)
    if found is None:
        return None
    shape = (int(pixels.shape[0]), int(pixels.shape[1]))
    lesion, brain = load_mask(found.lesion, shape), load_mask(found.brain, shape)
    has_lesion = lesion is not None and bool(lesion.any())
    return {m: mask_scores(cam, lesion if has_lesion else None, brain)
            for m, cam in maps.items()}


def sanity_indices(n: int, k: int) -> np.ndarray:
    """k (at most n) image indices spread evenly over 0..n-1."""
    return np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(int)) if n else np.array([])


def randomise(
    model: OnnxModel, explainer: Explainer, x: np.ndarray, targets: np.ndarray,
    settings: AuditSettings, tick: Progress,
) -> dict[str, list[dict[str, Any]]]:
    """The cascading randomisation test: gradient methods on the Grad-CAM graph,
    occlusion on the classifier graph, each graph's layers top-down."""
    import onnx

    pick = sanity_indices(len(x), settings.sanity_images)
    if not pick.size or settings.sanity_images < 1:
        return {m: [] for m in settings.methods}
    xs, ts = x[pick], targets[pick]
    providers = model.providers.active
    result: dict[str, list[dict[str, Any]]] = {}
    gradient_methods = [m for m in settings.methods if m != OCCLUSION]
    graphs = model.spec.graphs
    if gradient_methods:
        sub = Explainer(model, gradient_methods)
        original = sub.maps(xs, ts, at_input=False)
        graph = onnx.load(str(model.model_dir / graphs.gradcam.file))  # type: ignore[union-attr]
        result.update(randomisation_test(
            graph, PROBABILITIES_OUTPUT,
            lambda session: sub.maps(xs, ts, at_input=False, gradcam_session=session),
            original, providers, seed=settings.seed, on_step=lambda: tick("randomisation", 1),
        ))
    if OCCLUSION in settings.methods:
        sub = Explainer(model, [OCCLUSION])
        original = sub.maps(xs, ts)
        graph = onnx.load(str(model.model_dir / graphs.classifier.file))
        result.update(randomisation_test(
            graph, PROBABILITIES_OUTPUT,
            lambda session: sub.maps(xs, ts, classifier_session=session),
            original, providers, seed=settings.seed, on_step=lambda: tick("randomisation", 1),
        ))
    return {m: result[m] for m in settings.methods}
