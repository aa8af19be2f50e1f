"""Torch modules (scvi-tools ``BaseModuleClass`` subclasses) and their shared components; no AnnData inside."""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "ExpressionModuleBase": "_base",
        "ExpressionModule": "_zinb",
        "RidgeModule": "_ridge",
        "RetrievalModule": "_retrieval",
        "HeteroGraphModule": "_hetero_graph",
        "GraphAEModule": "_graph_ae",
        "MultimodalModule": "_multimodal",
        "CancerModule": "_cancer",
        "MLP": "_components",
        "ZINBHead": "_components",
        "Standardize": "_components",
        "CrossAttentionBlock": "_components",
        "info_nce": "_components",
    },
)
