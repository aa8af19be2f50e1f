"""Tools: expression prediction, cancer regions, evaluation."""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        # expression
        "fit_expression": "_expression",
        "predict_expression": "_expression",
        "evaluate_expression": "_evaluate",
        "cross_validate": "_evaluate",
        # cancer regions
        "fit_cancer_model": "_cancer",
        "detect_cancer_regions": "_cancer",
        "evaluate_cancer_regions": "_cancer",
        "expression_embedding": "_cancer",
    },
)
