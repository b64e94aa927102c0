"""Keras trainer: demo dataset, training, evaluation, model card (needs the `train` extra)."""
