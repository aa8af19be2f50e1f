"""Torch module of :class:`stfm.model.ExpressionPredictor` (method ``'zinb'``): embedding → ZINB over counts."""

from __future__ import annotations

import numpy as np
import torch
from scvi.module.base import LossOutput, auto_move_data

from .._constants import EXPR_KEYS
from ._base import ExpressionModuleBase
from ._components import MLP, Standardize, ZINBHead, composition_loss, zinb_variance

__all__ = ["ExpressionModule"]


class ExpressionModule(ExpressionModuleBase):
    """MLP from a (standardised) spot embedding to a zero-inflated negative binomial over a gene panel.

    Generative model for spot ``n`` and gene ``g``::

        h_n        = MLP(standardise(e_n))
        scale_n    = softmax(W_s h_n)              (normalised mean, sums to 1 over the panel)
        pi_ng      = sigmoid(W_z h_n)              (zero-inflation probability)
        log l_n^   = w_l · h_n + b_l               (library size predicted from the image)
        x_ng ~ ZINB(mu = l_n · scale_ng, theta_g, pi_ng)

    During training ``l_n`` is the observed library size (sum of counts over the panel); the predicted library
    size is fitted alongside with a Gaussian loss on ``log l_n`` so that H&E-only sections get a per-spot library
    size too. ``composition_weight > 0`` adds a composition term, the squared error between ``log1p(10⁴ · scale)``
    and ``log1p`` of the observed counts per 10k, summed over genes: the likelihood alone lets the model spend its
    capacity on depth, which the image predicts far better than composition.

    Parameters
    ----------
    n_input
        Embedding dimension (after neighbour pooling, if any).
    n_genes
        Number of genes in the panel.
    n_hidden, n_layers, dropout_rate, input_dropout
        The encoder :class:`~stfm.module._components.MLP`.
    embedding_mean, embedding_std
        Per-dimension statistics of the training embedding (buffers, saved with the model).
    log_library_mean
        Mean log library size of the training spots (initial bias of the library head).
    library_loss_weight
        Weight of the Gaussian log-library loss relative to the ZINB negative log-likelihood.
    composition_weight
        Weight of the composition term (0 = the likelihood alone).
    """

    has_std = True

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
        composition_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.n_input = n_input
        self.n_genes = n_genes
        self.library_loss_weight = float(library_loss_weight)
        self.composition_weight = float(composition_weight)
        self.standardize = Standardize(n_input, embedding_mean, embedding_std)
        self.encoder = MLP(n_input, n_hidden, n_layers, dropout=dropout_rate, input_dropout=input_dropout)
        self.head = ZINBHead(self.encoder.n_output, n_genes, log_library_mean=log_library_mean)

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
        return {"h": self.encoder(self.standardize(embedding))}

    @auto_move_data
    def generative(self, h: torch.Tensor, library: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """ZINB parameters; ``library=None`` uses the library size predicted from the image."""
        return self.head(h, library)

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict[str, torch.Tensor],
        generative_outputs: dict[str, torch.Tensor],
        kl_weight: float = 1.0,
    ) -> LossOutput:
        """ZINB NLL summed over genes + weighted log-library loss (+ weighted composition term)."""
        x = tensors[EXPR_KEYS.X_KEY]
        nll = -generative_outputs["px"].log_prob(x).sum(-1)
        lib = x.sum(-1, keepdim=True)
        lib_loss = 0.5 * (generative_outputs["log_library_pred"] - torch.log(lib.clamp(min=1.0))).pow(2).squeeze(-1)
        total = nll + self.library_loss_weight * lib_loss
        extra = {"library_loss": lib_loss.mean()}
        if self.composition_weight > 0:
            comp = composition_loss(generative_outputs["scale"], x, lib)
            total = total + self.composition_weight * comp
            extra["composition_loss"] = comp.mean()
        return LossOutput(loss=total.mean(), reconstruction_loss=nll, extra_metrics=extra, n_obs_minibatch=x.shape[0])

    # -- stfm expression-module contract ---------------------------------------------------------------
    @auto_move_data
    def predict_batch(self, tensors: dict[str, torch.Tensor]) -> dict:
        """Composition ``scale``, predicted log library size and the zero-inflation logits (for the std)."""
        h = self.inference(tensors[EXPR_KEYS.EMBEDDING_KEY])["h"]
        out = self.head(h)
        return {"scale": out["scale"], "log_library": out["log_library_pred"].squeeze(-1), "aux": {"zi_logits": out["zi_logits"]}}

    def predictive_std(self, mean: torch.Tensor, aux: dict[str, torch.Tensor]) -> torch.Tensor:
        """ZINB standard deviation at NB mean ``mean``: ``sqrt((1 − π) μ (1 + μ / θ + π μ))``."""
        theta = torch.exp(self.head.log_theta).to(mean.device)
        return torch.sqrt(zinb_variance(mean, theta, torch.sigmoid(aux["zi_logits"].to(mean.device))))

    @property
    def log_theta(self) -> torch.Tensor:
        """Gene-wise log inverse dispersion."""
        return self.head.log_theta

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
        draws = self.generative(**gen_in)["px"].sample((n_samples,))
        return draws[0] if n_samples == 1 else draws
