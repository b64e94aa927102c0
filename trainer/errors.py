"""Trainer errors that the CLIs turn into a one-line message and a non-zero exit.

Kept free of TensorFlow imports so that the CLIs can name them before loading it.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A training option is out of range or inconsistent, or the data cannot be built."""


class WeightsError(ValueError):
    """A --weights file is missing or matches no layer of the model."""
