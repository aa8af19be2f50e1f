"""Spatial layer below the models: spot pitch, per-section neighbour graphs, context pooling, regions, PyG builders.

Nothing here reads or writes AnnData slots: functions take coordinates (``obsm['spatial']``, (x, y) in
full-resolution pixels), per-spot features and section labels, and return arrays, sparse matrices or
:mod:`torch_geometric` objects. Neighbours never cross sections when ``groups`` is given. torch and
torch_geometric are imported only by the PyG builders.
"""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "spot_pitch": "_geometry",
        "section_indices": "_geometry",
        "knn_indices": "_geometry",
        "knn_graph": "_geometry",
        "radius_graph": "_geometry",
        "radius_pairs": "_geometry",
        "smoothing_matrix": "_geometry",
        "spatial_blocks": "_geometry",
        "ring_radii": "_context",
        "pool_context": "_context",
        "pool_context_reference": "_context",
        "call_regions": "_regions",
        "tumour_shapes": "_regions",
        "spatial_data": "_pyg",
        "similarity_topk": "_pyg",
        "reference_graph": "_pyg",
    },
)
