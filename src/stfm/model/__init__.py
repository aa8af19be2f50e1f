"""Trainable models on scvi-tools infrastructure, and the expression-method registry.

``stfm.model.list_methods()`` lists the registered expression methods; each is an
:class:`ExpressionModelBase` subclass registered with :func:`register_expression_method`.
"""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "ExpressionModelBase": "_base",
        "validation_scores": "_training",
        "ExpressionPredictor": "_zinb",
        "RidgeProbe": "_ridge",
        "RetrievalPredictor": "_retrieval",
        "HeteroGraphPredictor": "_hetero_graph",
        "GraphAEPredictor": "_graph_ae",
        "MultimodalPredictor": "_multimodal",
        "ExpressionEnsemble": "_ensemble",
        "load_model": "_ensemble",
        "list_methods": "_registry",
        "get_method": "_registry",
        "register_expression_method": "_registry",
        "CheckpointError": "_persist",
        "CancerClassifier": "_cancer",
    },
)
