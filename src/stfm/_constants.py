"""Registry keys and slot names shared by stfm's models and tools (squidpy ``Key`` / scvi ``REGISTRY_KEYS`` style)."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["EXPR_KEYS", "Key"]


class _ExpressionRegistryKeys(NamedTuple):
    X_KEY: str = "X"
    EMBEDDING_KEY: str = "embedding"
    SECTION_KEY: str = "section"
    PATIENT_KEY: str = "patient"


#: Keys under which :class:`stfm.model.ExpressionPredictor` registers its AnnData fields.
EXPR_KEYS = _ExpressionRegistryKeys()


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
    def std(key_added: str) -> str:
        """Layer with the ZINB standard deviation next to ``layers[key_added]``."""
        return f"{key_added}_std"
