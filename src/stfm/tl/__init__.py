"""Tools: expression prediction, cancer regions, evaluation."""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        # expression
        "fit_expression": "_expression",
        "predict_expression": "_expression",
        "select_genes": "_expression",
        "evaluate_expression": "_evaluate",
        "cross_validate": "_evaluate",
        # cancer regions
        "fit_cancer_model": "_cancer_fit",
        "detect_cancer_regions": "_cancer_detect",
        "evaluate_cancer_regions": "_cancer_evaluate",
        "expression_embedding": "_expression_embedding",
    },
)
