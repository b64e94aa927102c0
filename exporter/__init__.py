"""Keras -> ONNX: a classifier graph and a Grad-CAM graph, behind a parity gate."""
