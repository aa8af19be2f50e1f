"""Torch module of :class:`stfm.model.ExpressionPredictor`: embedding → ZINB over counts (no AnnData inside)."""

from __future__ import annotations

import numpy as np
import torch
from scvi.distributions import ZeroInflatedNegativeBinomial
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from .._constants import EXPR_KEYS

__all__ = ["ExpressionModule"]


class ExpressionModule(BaseModuleClass):
    """MLP from a (standardised) tile embedding to a zero-inflated negative binomial over a gene panel.

    Generative model for spot ``n`` and gene ``g``::

        h_n        = MLP(standardise(e_n))
        scale_n    = softmax(W_s h_n)              (normalised mean, sums to 1 over the panel)
        pi_ng      = sigmoid(W_z h_n)              (zero-inflation probability)
        log l_n^   = w_l · h_n + b_l               (library size predicted from the image)
        x_ng ~ ZINB(mu = l_n · scale_ng, theta_g, pi_ng)

    During training ``l_n`` is the observed library size (sum of counts over the panel); the predicted
    library size is fitted alongside with a Gaussian loss on ``log l_n`` so that H&E-only sections can be
    given a per-spot library size too.

    Parameters
    ----------
    n_input
        Embedding dimension (after neighbour pooling, if any).
    n_genes
        Number of genes in the panel.
    n_hidden
        Width of the hidden layers.
    n_layers
        Number of hidden layers.
    dropout_rate
        Dropout after each hidden layer.
    input_dropout
        Dropout on the standardised embedding.
    embedding_mean, embedding_std
        Per-dimension statistics of the training embedding (stored as buffers, saved with the model).
    log_library_mean
        Mean log library size of the training spots (initial bias of the library head).
    library_loss_weight
        Weight of the Gaussian log-library loss relative to the ZINB negative log-likelihood.
    """

    def __init__(
        self,
        n_input: int,
        n_genes: int,
        *,
        n_hidden: int = 256,
        n_layers: int = 1,
        dropout_rate: float = 0.2,
        input_dropout: float = 0.1,
        embedding_mean: np.ndarray | None = None,
        embedding_std: np.ndarray | None = None,
        log_library_mean: float = 0.0,
        library_loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.n_input = n_input
        self.n_genes = n_genes
        self.library_loss_weight = library_loss_weight
        mean = np.zeros(n_input, np.float32) if embedding_mean is None else np.asarray(embedding_mean, np.float32)
        std = np.ones(n_input, np.float32) if embedding_std is None else np.asarray(embedding_std, np.float32)
        self.register_buffer("embedding_mean", torch.as_tensor(mean))
        self.register_buffer("embedding_std", torch.as_tensor(np.maximum(std, 1e-6)))

        layers: list[nn.Module] = [nn.Dropout(input_dropout)]
        d = n_input
        for _ in range(n_layers):
            layers += [nn.Linear(d, n_hidden), nn.LayerNorm(n_hidden), nn.GELU(), nn.Dropout(dropout_rate)]
            d = n_hidden
        self.encoder = nn.Sequential(*layers)
        self.scale_head = nn.Linear(d, n_genes)
        self.zi_head = nn.Linear(d, n_genes)
        self.library_head = nn.Linear(d, 1)
        nn.init.zeros_(self.library_head.weight)
        nn.init.constant_(self.library_head.bias, float(log_library_mean))
        nn.init.constant_(self.zi_head.bias, -2.0)
        # gene-wise inverse dispersion, log scale
        self.log_theta = nn.Parameter(torch.zeros(n_genes))

    # -- scvi BaseModuleClass interface ---------------------------------------------------------------
    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"embedding": tensors[EXPR_KEYS.EMBEDDING_KEY]}

    def _get_generative_input(
        self, tensors: dict[str, torch.Tensor], inference_outputs: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor | None]:
        x = tensors.get(EXPR_KEYS.X_KEY)
        library = None if x is None else x.sum(-1, keepdim=True)
        return {"h": inference_outputs["h"], "library": library}

    @auto_move_data
    def inference(self, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encode the standardised embedding into the hidden representation ``h``."""
        z = (embedding.float() - self.embedding_mean) / self.embedding_std
        return {"h": self.encoder(z)}

    @auto_move_data
    def generative(self, h: torch.Tensor, library: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """ZINB parameters; ``library=None`` uses the library size predicted from the image."""
        scale = torch.softmax(self.scale_head(h), dim=-1)
        zi_logits = self.zi_head(h)
        log_library_pred = self.library_head(h)
        if library is None:
            library = torch.exp(log_library_pred)
        theta = torch.exp(self.log_theta).expand_as(scale)
        px = ZeroInflatedNegativeBinomial(mu=library * scale, theta=theta, zi_logits=zi_logits, scale=scale)
        return {"px": px, "scale": scale, "log_library_pred": log_library_pred, "library": library}

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict[str, torch.Tensor],
        generative_outputs: dict[str, torch.Tensor],
        kl_weight: float = 1.0,
    ) -> LossOutput:
        """ZINB negative log-likelihood summed over genes + weighted Gaussian loss on the log library size."""
        x = tensors[EXPR_KEYS.X_KEY]
        nll = -generative_outputs["px"].log_prob(x).sum(-1)
        log_lib = torch.log(x.sum(-1, keepdim=True).clamp(min=1.0))
        lib_loss = 0.5 * (generative_outputs["log_library_pred"] - log_lib).pow(2).squeeze(-1)
        total = nll + self.library_loss_weight * lib_loss
        return LossOutput(
            loss=total.mean(),
            reconstruction_loss=nll,
            extra_metrics={"library_loss": lib_loss.mean()},
            n_obs_minibatch=x.shape[0],
        )

    @torch.inference_mode()
    def sample(
        self, tensors: dict[str, torch.Tensor], n_samples: int = 1, library: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Draw counts from the fitted ZINB: shape ``(n_samples, n_obs, n_genes)`` (``n_samples=1`` squeezed).

        ``library=None`` uses the observed library size when counts are in ``tensors``, else the predicted one.
        """
        inf = self.inference(**self._get_inference_input(tensors))
        gen_in = self._get_generative_input(tensors, inf)
        if library is not None:
            gen_in["library"] = library
        px = self.generative(**gen_in)["px"]
        draws = px.sample((n_samples,))
        return draws[0] if n_samples == 1 else draws
