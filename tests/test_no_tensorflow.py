"""The service runs with the `cpu` extra alone: TensorFlow, Keras and tf2onnx are
made unimportable in a fresh interpreter, which then imports every service module,
serves a model and answers /predict and /explain."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    BLOCKED = {"tensorflow", "keras", "tf_keras", "tf2onnx"}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked: the service must not need it")
            return None

    sys.meta_path.insert(0, Block())

    import service
    for info in pkgutil.walk_packages(service.__path__, prefix="service."):
        if not info.name.endswith("__main__"):  # it would start a server
            importlib.import_module(info.name)

    from fastapi.testclient import TestClient
    from service.core.config import Settings
    from service.main import create_app

    model_dir, image = sys.argv[1], sys.argv[2]
    settings = Settings(model_dir=model_dir, providers="CPUExecutionProvider")
    with TestClient(create_app(settings)) as client:
        assert client.app.state.runtime.wait(120), client.get("/health").json()
        data = open(image, "rb").read()
        res = client.post("/predict", files={"file": ("x.png", data)})
        assert res.status_code == 200, res.text
        res = client.post("/explain", files={"file": ("x.png", data)}, data={"method": "layercam"})
        assert res.status_code == 200, res.text
    loaded = sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)
    assert not loaded, loaded
    print("served without", ", ".join(sorted(BLOCKED)))
    """
)


def test_service_needs_no_tensorflow(tiny_model_dir: Path, tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    cv2.imwrite(str(image), np.tile(np.arange(60, dtype=np.uint8) * 4, (48, 1)))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_model_dir), str(image)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "served without" in proc.stdout
