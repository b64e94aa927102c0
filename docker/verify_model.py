"""Check a model directory before it is baked into an image (Dockerfile `model` stage).

    python verify_model.py MODEL_DIR

The directory must hold model.json (a JSON object), classifier.onnx and
gradcam.onnx, and both graphs must load in this ONNX Runtime on the CPU. The
`model` stage installs the same ORT release range (ORT_SPEC) as the runtime
images, so a graph this ORT cannot load (e.g. too new an ONNX IR version) fails
the build here rather than the service at start-up.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REQUIRED = ("model.json", "classifier.onnx", "gradcam.onnx")


def verify(model_dir: Path) -> list[str]:
    missing = [name for name in REQUIRED if not (model_dir / name).is_file()]
    if missing:
        return [f"{model_dir}: missing {', '.join(missing)}"]
    problems = []
    try:
        if not isinstance(json.loads((model_dir / "model.json").read_text("utf-8")), dict):
            problems.append("model.json is not a JSON object")
    except ValueError as exc:
        problems.append(f"model.json is not JSON: {exc}")
    import onnxruntime

    for name in REQUIRED[1:]:
        try:
            session = onnxruntime.InferenceSession(
                str(model_dir / name), providers=["CPUExecutionProvider"]
            )
            inputs = [(i.name, i.shape) for i in session.get_inputs()]
            print(f"{name}: loads in onnxruntime {onnxruntime.__version__}, inputs {inputs}")
        except Exception as exc:
            problems.append(f"{name} does not load in onnxruntime {onnxruntime.__version__}: {exc}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: verify_model.py MODEL_DIR", file=sys.stderr)
        return 2
    problems = verify(Path(argv[0]))
    for problem in problems:
        print(f"verify_model: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
