"""Registry keys and slot names shared by stfm's models and tools (squidpy ``Key`` / scvi ``REGISTRY_KEYS`` style)."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["CANCER_MARKERS", "EXPR_KEYS", "REGION_CATEGORIES", "REGION_COLORS", "Key"]


class _ExpressionRegistryKeys(NamedTuple):
    X_KEY: str = "X"
    EMBEDDING_KEY: str = "embedding"
    SECTION_KEY: str = "section"
    PATIENT_KEY: str = "patient"
    SPATIAL_KEY: str = "spatial"


#: Keys under which every expression model (:class:`stfm.model.ExpressionModelBase`) registers its AnnData fields.
EXPR_KEYS = _ExpressionRegistryKeys()

#: Marker genes of the ``method='signature'`` cancer score: epithelial / luminal breast carcinoma and HER2 amplicon
#: genes (ERBB2 and its co-amplified neighbours GRB7, PGAP3, STARD3), keratins and adhesion molecules of carcinoma cells.
CANCER_MARKERS: tuple[str, ...] = (
    "ERBB2", "GRB7", "PGAP3", "STARD3", "KRT19", "KRT18", "KRT8", "KRT7", "EPCAM", "CD24", "MUC1", "CDH1",
    "CLDN4", "TACSTD2", "SPINT2", "AGR2",
)  # fmt: skip
#: Categories of ``obs['cancer_region']``, in this order.
REGION_CATEGORIES: tuple[str, ...] = ("tumor", "boundary", "non-tumor")
#: Colours of :data:`REGION_CATEGORIES` (``uns['cancer_region_colors']``).
REGION_COLORS: tuple[str, ...] = ("#d62728", "#ff9f1c", "#4c78a8")


class Key:
    """Default slot names written by stfm."""

    PREDICTED = "predicted"
    PREDICTED_STD = "predicted_std"
    PROVENANCE = "stfm"

    @staticmethod
    def pooled(embedding_key: str, n_neighbors: tuple[int, ...]) -> str:
        """obsm key holding ``embedding_key`` concatenated with its spatial-neighbour means."""
        return f"{embedding_key}_nbr{'-'.join(str(k) for k in n_neighbors)}"

    @staticmethod
    def section_standardized(embedding_key: str) -> str:
        """obsm key holding ``embedding_key`` centred and scaled within each section (``embedding_standardize``)."""
        return f"{embedding_key}_section_z"

    @staticmethod
    def std(key_added: str) -> str:
        """Layer with the predictive standard deviation next to ``layers[key_added]``."""
        return f"{key_added}_std"
