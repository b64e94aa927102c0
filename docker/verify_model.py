"""Check the model directory baked into a runtime image (Dockerfile `cpu`/`gpu` stages).

    python verify_model.py MODEL_DIR

Fails (exit 1, one line per problem) unless
- model.json is a valid model spec (braincam.model_spec) and every file it lists
  (classifier.onnx, gradcam.onnx, shared weights) is present with its recorded sha256;
- both graphs load in this image's ONNX Runtime (on the CPU EP: there is no GPU
  while an image is built), so a graph too new for the pinned ORT release (ONNX IR
  version, opset) fails the build rather than the service at start-up;
- one image through the service's own code (braincam.inference.OnnxModel) gives
  finite probabilities over the model's labels that sum to 1, and the Grad-CAM
  graph returns the classifier's probabilities and activations of the recorded shape.
"""

from __future__ import annotations

import sys
from pathlib import Path

CPU = ["CPUExecutionProvider"]
PROBABILITY_TOLERANCE = 1e-4


def _spec_problems(model_dir: Path) -> list[str]:
    from braincam.model_spec import load_spec

    try:
        spec = load_spec(model_dir, verify=True)  # schema + sha256 of every listed file
    except (FileNotFoundError, ValueError) as exc:  # pydantic/JSON errors are ValueErrors
        lines = [line.strip() for line in str(exc).splitlines()]
        return [f"{model_dir}: " + " / ".join(line for line in lines
                                               if line and not line.startswith("For further"))]
    print(f"{spec.name} v{spec.version}: model.json valid, labels {spec.labels}; "
          f"sha256 matches for {', '.join(f.file for f in spec.graphs.files())}")
    return []


def _load_problems(model_dir: Path) -> list[str]:
    import onnxruntime

    from braincam.model_spec import load_spec

    spec = load_spec(model_dir, verify=False)
    problems = []
    for graph in (spec.graphs.classifier, spec.graphs.gradcam):
        try:
            onnxruntime.InferenceSession(str(model_dir / graph.file), providers=CPU)
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph)
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            problems.append(
                f"{graph.file} does not load in onnxruntime {onnxruntime.__version__}: {first}"
            )
    if not problems:
        print(f"both graphs load in onnxruntime {onnxruntime.__version__}")
    return problems


def _inference_problems(model_dir: Path) -> list[str]:
    import numpy as np

    from braincam.inference import OnnxModel

    model = OnnxModel(model_dir, providers=CPU)
    spec = model.spec
    rng = np.random.default_rng(0)
    image = rng.uniform(0.0, 1.0, size=(1, *spec.input_shape)).astype(np.float32)
    probs = model.predict(image)
    cam = model.gradcam(image)
    problems = []
    if probs.shape != (1, len(spec.labels)):
        problems.append(f"classifier returns {probs.shape}, want (1, {len(spec.labels)})")
    elif not np.all(np.isfinite(probs)) or abs(float(probs.sum()) - 1.0) > PROBABILITY_TOLERANCE:
        problems.append(f"classifier probabilities are not a distribution: {probs.tolist()}")
    elif cam.probabilities.shape != probs.shape or not np.allclose(
        cam.probabilities, probs, atol=PROBABILITY_TOLERANCE
    ):
        problems.append(
            f"gradcam.onnx probabilities {cam.probabilities.tolist()} differ from "
            f"classifier.onnx's {probs.tolist()}"
        )
    want = (1, *spec.explanation.activation_shape)
    for name, value in (("activations", cam.activations), ("gradients", cam.gradients)):
        if value.shape != want:
            problems.append(f"gradcam.onnx {name} have shape {value.shape}, want {want}")
    if not problems:
        rounded = [round(float(p), 4) for p in probs[0]]
        print(f"one image: probabilities {rounded} (both graphs agree), "
              f"activations {list(cam.activations.shape)}")
    return problems


def verify(model_dir: Path) -> list[str]:
    """Every problem found, in order; a later check runs only if the earlier ones passed."""
    for check in (_spec_problems, _load_problems, _inference_problems):
        problems = check(model_dir)
        if problems:
            return problems
    return []


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: verify_model.py MODEL_DIR", file=sys.stderr)
        return 2
    problems = verify(Path(argv[0]))
    for problem in problems:
        print(f"verify_model: {problem}", file=sys.stderr)
    if not problems:
        print(f"verify_model: {argv[0]} ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
