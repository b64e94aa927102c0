#!/bin/sh
# Slims /opt/venv for a runtime image (the Dockerfile's cpu-venv and gpu-venv stages):
# no pip/setuptools (nothing is installed at run time), no test suites, type stubs or
# C headers of the dependencies, none of ONNX Runtime's offline model tools
# (transformers, quantization) nor numpy's f2py, and bytecode only for the modules the
# service imports: check_env.py imports every braincam and service module, and the
# root file system is read-only at run time, so these .pyc files are what start-up reads.
set -eu
site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
pip uninstall --yes --quiet pip setuptools
rm -rf "$site/onnxruntime/transformers" "$site/onnxruntime/quantization" \
  "$site/onnxruntime/tools" "$site/numpy/f2py"
find "$site" -depth \( -type d \( -name tests -o -name __pycache__ -o -name include \) \
  -o -type f -name "*.pyi" \) -exec rm -rf {} +
python /opt/braincam/check_env.py imports
