"""The Grad-CAM graph built at the ONNX level: graph analysis, one backward rule per
op type, and the builder that appends the reverse-mode pass (no training framework)."""

from exporter.onnx_grad.anatomy import GraphAnatomy
from exporter.onnx_grad.builder import BuiltGraphs, build_graphs
from exporter.onnx_grad.rules import RULES

__all__ = ["RULES", "BuiltGraphs", "GraphAnatomy", "build_graphs"]
