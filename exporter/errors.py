"""The exporter's one error type (no framework import, so the ONNX path can raise it)."""

from __future__ import annotations


class ExportError(Exception):
    """The model cannot be exported as asked; the message says why."""
