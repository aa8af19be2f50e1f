"""Torch module of :class:`stfm.model.RidgeProbe` (method ``'ridge'``): a fitted linear probe held as buffers."""

from __future__ import annotations

import torch
from scvi.module.base import LossOutput

from .._constants import EXPR_KEYS
from ._base import ExpressionModuleBase
from ._components import log_composition

__all__ = ["RidgeModule"]


class RidgeModule(ExpressionModuleBase):
    """Standardise → PCA projection → linear heads, all as buffers (fitted in closed form by the model).

    ``target='composition'``: one head predicts ``log1p`` counts per 10k over the panel (the composition), a second
    the log library size (depth); ``scale = normalise(expm1(·))`` and the library head give the prediction.
    ``target='log1p'``: one head predicts ``log1p`` raw counts (the HEST-Benchmark probe); composition and library
    size are read off ``expm1(·)``.

    Parameters
    ----------
    n_input
        Embedding dimension.
    n_genes
        Gene panel size.
    n_components
        PCA dimensions.
    target
        ``'composition'`` or ``'log1p'``.
    """

    def __init__(self, n_input: int, n_genes: int, n_components: int, *, target: str = "composition") -> None:
        super().__init__()
        self.target = target
        self.register_buffer("scaler_mean", torch.zeros(n_input))
        self.register_buffer("scaler_scale", torch.ones(n_input))
        self.register_buffer("pca_mean", torch.zeros(n_input))
        self.register_buffer("components", torch.zeros(n_components, n_input))
        self.register_buffer("coef", torch.zeros(n_genes, n_components))
        self.register_buffer("offset", torch.zeros(n_genes))
        self.register_buffer("lib_coef", torch.zeros(1, n_components))
        self.register_buffer("lib_offset", torch.zeros(1))

    def set_params(self, **arrays) -> None:
        """Replace buffers with fitted arrays (shapes may change with the data)."""
        for name, value in arrays.items():
            self._buffers[name] = torch.as_tensor(value, dtype=torch.float32).contiguous()

    def project(self, embedding: torch.Tensor) -> torch.Tensor:
        """PCA scores of the standardised embedding (inputs are moved to the buffers' device)."""
        embedding = embedding.to(self.components.device)
        z = (embedding.float() - self.scaler_mean) / self.scaler_scale - self.pca_mean
        return z @ self.components.T

    # -- scvi interface (nothing is trained by gradient descent) ----------------------------------------
    def _get_inference_input(self, tensors):
        return {"embedding": tensors[EXPR_KEYS.EMBEDDING_KEY]}

    def _get_generative_input(self, tensors, inference_outputs):
        return {"z": inference_outputs["z"]}

    def inference(self, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        """PCA scores ``z``."""
        return {"z": self.project(embedding)}

    def generative(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Head outputs: ``y`` (log1p scale) and the predicted log library size."""
        return {"y": z @ self.coef.T + self.offset, "log_library": (z @ self.lib_coef.T + self.lib_offset).squeeze(-1)}

    def loss(self, tensors, inference_outputs, generative_outputs) -> LossOutput:
        """Squared error of the head on its target (for reporting only: the probe is fitted in closed form)."""
        x = tensors[EXPR_KEYS.X_KEY]
        target = torch.log1p(x) if self.target == "log1p" else log_composition(x)
        err = (generative_outputs["y"] - target).pow(2).sum(-1)
        return LossOutput(loss=err.mean(), reconstruction_loss=err, n_obs_minibatch=x.shape[0])

    # -- stfm expression-module contract ---------------------------------------------------------------
    def predict_batch(self, tensors: dict[str, torch.Tensor]) -> dict:
        """Composition and log library size from the fitted heads."""
        gen = self.generative(self.project(tensors[EXPR_KEYS.EMBEDDING_KEY]))
        counts = torch.expm1(gen["y"].clamp(min=0.0))
        total = counts.sum(-1, keepdim=True)
        n_genes = counts.shape[-1]
        scale = torch.where(total > 0, counts / total.clamp(min=1e-30), torch.full_like(counts, 1.0 / n_genes))
        if self.target == "log1p":
            log_library = torch.log(total.squeeze(-1).clamp(min=1e-12))
        else:
            log_library = gen["log_library"]
        return {"scale": scale, "log_library": log_library, "aux": {}}
