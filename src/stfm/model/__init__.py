"""Trainable models on scvi-tools infrastructure (``BaseModelClass`` subclasses)."""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "ExpressionPredictor": "_expression",
        "RidgeProbe": "_ridge",
        "CancerClassifier": "_cancer",
    },
)
