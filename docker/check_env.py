"""Build-time check of a runtime image (run by the Dockerfile's cpu and gpu stages).

    python check_env.py gpu|cpu      (`imports`: only the import checks, for the tests)

Exits 1, one line per problem, when
- a distribution that must not be in a runtime image is installed: TensorFlow,
  Keras, tf2onnx anywhere; the CPU `onnxruntime` package in the gpu image (it and
  onnxruntime-gpu share the `onnxruntime` import package and overwrite each other);
  onnxruntime-gpu in the cpu image;
- the installed ONNX Runtime lacks the execution provider the image is for;
- (gpu) a shared library that ORT's CUDA provider or the CUDA/cuDNN wheels need does
  not resolve (the driver's libcuda.so.1 aside: the NVIDIA Container Toolkit mounts
  it when a container starts with a GPU);
- a module of `braincam` or `service` fails to import, or importing them loads TensorFlow;
- a compiler is on PATH.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import pkgutil
import re
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

ALWAYS_FORBIDDEN = {
    "tensorflow",
    "tensorflow-cpu",
    "tensorflow-intel",
    "tf-keras",
    "keras",
    "tf2onnx",
}
VARIANTS = {
    # variant: (ORT distribution required, ORT distribution forbidden, EP required)
    "gpu": ("onnxruntime-gpu", "onnxruntime", "CUDAExecutionProvider"),
    "cpu": ("onnxruntime", "onnxruntime-gpu", "CPUExecutionProvider"),
}
COMPILERS = ("cc", "gcc", "g++", "c++", "clang", "x86_64-linux-gnu-gcc", "aarch64-linux-gnu-gcc")
PACKAGES = ("braincam", "service")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def import_problems() -> list[str]:
    problems = []
    for package in PACKAGES:
        try:
            module = importlib.import_module(package)
        except Exception:
            problems.append(f"{package} does not import:\n{traceback.format_exc()}")
            continue
        for info in pkgutil.walk_packages(module.__path__, prefix=f"{package}."):
            if info.name.rsplit(".", 1)[-1] == "__main__":  # would start the server
                continue
            try:
                importlib.import_module(info.name)
            except Exception:
                problems.append(f"{info.name} does not import:\n{traceback.format_exc()}")
    loaded = sorted({m.split(".")[0] for m in sys.modules} & {"tensorflow", "keras", "tf2onnx"})
    if loaded:
        problems.append(f"importing {', '.join(PACKAGES)} loaded {', '.join(loaded)}")
    return problems


# Provided by the host's NVIDIA driver at run time, never by the image.
DRIVER_LIBRARIES = ("libcuda.so", "libnvidia-")


def unresolved_libraries(paths: list[Path]) -> list[str]:
    """`ldd` of each shared library: what the dynamic loader cannot find."""
    problems = []
    for path in paths:
        out = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=False)
        for line in out.stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            if "not found" in line and not name.startswith(DRIVER_LIBRARIES):
                problems.append(f"{path.name} needs {name}, which the dynamic loader does not find")
    return problems


def cuda_library_problems() -> list[str]:
    import onnxruntime

    provider = Path(onnxruntime.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if not provider.is_file():
        return [f"{provider} is missing"]
    site = Path(onnxruntime.__file__).parents[1]
    wheels = sorted(p for p in site.glob("nvidia/*/lib/lib*.so*") if p.is_file())
    if not any(p.name.startswith("libcudnn") for p in wheels):
        return ["no cuDNN library (nvidia-cudnn-*): install onnxruntime-gpu[cuda,cudnn]"]
    return unresolved_libraries([provider, *wheels])


def check(variant: str) -> list[str]:
    required, forbidden, provider = VARIANTS[variant]
    installed = {_norm(d.metadata["Name"]) for d in md.distributions() if d.metadata["Name"]}
    problems = [
        f"forbidden distribution installed: {name}"
        for name in sorted((ALWAYS_FORBIDDEN | {forbidden}) & installed)
    ]
    if required not in installed:
        problems.append(f"required distribution missing: {required}")
    try:
        import onnxruntime

        available = onnxruntime.get_available_providers()
        if provider not in available:
            problems.append(f"{provider} not in this onnxruntime build: {available}")
    except Exception as exc:
        problems.append(f"onnxruntime does not import: {exc!r}")
    if variant == "gpu" and not problems:
        problems += cuda_library_problems()
    problems += import_problems()
    problems += [f"compiler on PATH: {shutil.which(c)}" for c in COMPILERS if shutil.which(c)]
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in (*VARIANTS, "imports"):
        print(f"usage: check_env.py {'|'.join(VARIANTS)}|imports", file=sys.stderr)
        return 2
    problems = import_problems() if argv[0] == "imports" else check(argv[0])
    for problem in problems:
        print(f"check_env ({argv[0]}): {problem}", file=sys.stderr)
    if not problems:
        print(f"check_env ({argv[0]}): ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
