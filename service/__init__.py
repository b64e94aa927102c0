"""braincam inference service: FastAPI on ONNX Runtime. Imports no TensorFlow."""
