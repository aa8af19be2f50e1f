"""Torch module of :class:`stfm.model.RetrievalPredictor` (method ``'retrieval'``): contrastive image ↔ expression
towers and a reference bank of training spots queried by similarity (after STco / BLEEP)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scvi.module.base import LossOutput, auto_move_data
from torch import nn

from .._constants import EXPR_KEYS
from ._base import ExpressionModuleBase
from ._components import MLP, ReferenceBank, Standardize, info_nce, log_composition

__all__ = ["RETRIEVAL_KEYS", "RetrievalModule"]


class RETRIEVAL_KEYS:
    """Extra registry key of the retrieval model."""

    POSITION = "relative_position"


def fourier_features(pos: torch.Tensor, n_frequencies: int) -> torch.Tensor:
    """``sin`` / ``cos`` of positions (in spot pitches) at periods of 128, 64, …, pitches: ``(n, 4 · n_frequencies)``."""
    freqs = (2.0 ** torch.arange(n_frequencies, device=pos.device, dtype=torch.float32)) * (math.pi / 64.0)
    ang = pos.float().unsqueeze(-1) * freqs
    return torch.cat([ang.sin(), ang.cos()], dim=-1).flatten(1)


class RetrievalModule(ReferenceBank, ExpressionModuleBase):
    """Image tower (FM embedding) and expression tower (``log1p`` counts per 10k ‖ Fourier features of the
    section-relative position), trained with symmetric InfoNCE on L2-normalised embeddings and a learned
    temperature. Prediction retrieves the ``k`` bank spots whose expression embedding is most similar to the
    query's image embedding and averages their ``log1p`` composition and log library size.

    Weights of the ``k`` retrieved spots: ``'inverse_square'`` = ``1 / d²`` with ``d`` the Euclidean distance of the
    normalised embeddings (STco's), or ``'softmax'`` = ``softmax(cos / τ)`` with the learned temperature τ.

    The bank (training spots' composition, library size and position) is held as buffers and saved with the model;
    its expression embeddings are recomputed from the current weights whenever the module enters eval mode.
    """

    has_std = True

    def __init__(
        self,
        n_input: int,
        n_genes: int,
        *,
        n_latent: int = 128,
        n_hidden: int = 256,
        dropout_rate: float = 0.2,
        n_frequencies: int = 8,
        use_position: bool = True,
        temperature: float = 0.5,
        learn_temperature: bool = True,
        k: int = 50,
        weighting: str = "inverse_square",
        embedding_mean: np.ndarray | None = None,
        embedding_std: np.ndarray | None = None,
        composition_mean: np.ndarray | None = None,
        composition_std: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.n_genes = int(n_genes)
        self.n_frequencies = int(n_frequencies)
        self.use_position = bool(use_position)
        self.k = int(k)
        self.weighting = weighting
        self.standardize = Standardize(n_input, embedding_mean, embedding_std)
        self.comp_standardize = Standardize(n_genes, composition_mean, composition_std)
        self.image_tower = MLP(n_input, n_hidden, 1, n_output=n_latent, dropout=dropout_rate, input_dropout=dropout_rate)
        n_expr = n_genes + (4 * self.n_frequencies if self.use_position else 0)
        self.expression_tower = MLP(n_expr, n_hidden, 1, n_output=n_latent, dropout=dropout_rate, input_dropout=dropout_rate)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)), requires_grad=bool(learn_temperature))
        self._register_bank(n_input, n_genes, embedding=False)
        self.register_buffer("bank_position", torch.zeros(0, 2))
        self._bank_latent: torch.Tensor | None = None

    # -- bank --------------------------------------------------------------------------------------------
    def set_bank(self, counts: Any, position: np.ndarray | None) -> None:
        """Store the reference bank: composition (sparse) and log library size of these spots (and their positions)."""
        self._set_bank_composition(counts)
        n = int(self.bank_loglib.shape[0])
        pos = np.zeros((n, 2), np.float32) if position is None else np.asarray(position, np.float32)
        self.bank_position = torch.as_tensor(pos).to(self.bank_loglib.device)
        self._bank_latent = None

    def _apply(self, fn, recurse: bool = True):  # noqa: FBT001, FBT002 (torch's signature)
        self._bank_latent = None  # recomputed on the new device / dtype
        return super()._apply(fn, recurse)

    @property
    def bank_size(self) -> int:
        """Number of spots in the reference bank."""
        return int(self.bank_loglib.shape[0])

    def train(self, mode: bool = True):  # noqa: FBT001, FBT002 (torch's signature)
        """Switch mode; entering eval mode refreshes the bank's expression embeddings from the current weights."""
        super().train(mode)
        self._bank_latent = None if mode else self._encode_bank()
        return self

    @torch.no_grad()
    def _encode_bank(self) -> torch.Tensor | None:
        if self.bank_size == 0:
            return None
        out = []
        for a in range(0, self.bank_size, 4096):
            rows = torch.arange(a, min(a + 4096, self.bank_size), device=self.bank_position.device)
            out.append(self.encode_expression(self.bank_composition(rows), self.bank_position[rows]))
        return torch.cat(out)

    # -- towers ------------------------------------------------------------------------------------------
    def encode_image(self, embedding: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embedding."""
        return F.normalize(self.image_tower(self.standardize(embedding)), dim=-1)

    def encode_expression(self, logcomp: torch.Tensor, position: torch.Tensor | None) -> torch.Tensor:
        """L2-normalised expression embedding of ``log1p`` compositions (and positions)."""
        h = self.comp_standardize(logcomp)
        if self.use_position:
            pos = torch.zeros(h.shape[0], 2, device=h.device) if position is None else position
            h = torch.cat([h, fourier_features(pos, self.n_frequencies)], dim=-1)
        return F.normalize(self.expression_tower(h), dim=-1)

    # -- scvi interface ----------------------------------------------------------------------------------
    def _get_inference_input(self, tensors):
        return {
            "embedding": tensors[EXPR_KEYS.EMBEDDING_KEY],
            "x": tensors[EXPR_KEYS.X_KEY],
            "position": tensors.get(RETRIEVAL_KEYS.POSITION),
        }

    def _get_generative_input(self, tensors, inference_outputs):
        return {}

    @auto_move_data
    def inference(self, embedding: torch.Tensor, x: torch.Tensor, position: torch.Tensor | None = None) -> dict:
        """Both towers' embeddings of a minibatch."""
        return {"z_image": self.encode_image(embedding), "z_expression": self.encode_expression(log_composition(x), position)}

    def generative(self) -> dict:
        """No generative model: retrieval is discriminative."""
        return {}

    def loss(self, tensors, inference_outputs, generative_outputs) -> LossOutput:
        """Symmetric InfoNCE between the image and expression embeddings of the same spots."""
        nce = info_nce(inference_outputs["z_image"], inference_outputs["z_expression"], self.log_temperature, normalize=False)
        return LossOutput(loss=nce.mean(), reconstruction_loss=nce, extra_metrics={"temperature": self.log_temperature.exp().detach()},
                          n_obs_minibatch=nce.shape[0])  # fmt: skip

    # -- stfm expression-module contract -----------------------------------------------------------------
    def retrieve(self, z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` bank rows by cosine similarity to the image embeddings ``z`` (chunked over the bank)."""
        bank = self._bank_latent if self._bank_latent is not None else self._encode_bank()
        if bank is None:
            msg = "The retrieval model has an empty reference bank; it was not trained or its bank was not saved."
            raise RuntimeError(msg)
        k = min(int(k), bank.shape[0])
        best_s = torch.full((z.shape[0], k), -torch.inf, device=z.device)
        best_i = torch.zeros((z.shape[0], k), dtype=torch.long, device=z.device)
        for a in range(0, bank.shape[0], 16384):
            s = z @ bank[a : a + 16384].T
            top_s, top_i = s.topk(min(k, s.shape[1]), dim=1)
            cs, ci = torch.cat([best_s, top_s], 1), torch.cat([best_i, top_i + a], 1)
            best_s, pos = cs.topk(k, dim=1)
            best_i = ci.gather(1, pos)
        return best_s, best_i

    def weights(self, sims: torch.Tensor, weighting: str | None = None) -> torch.Tensor:
        """Normalised weights of retrieved spots from their cosine similarities."""
        weighting = weighting or self.weighting
        if weighting == "softmax":
            return torch.softmax(sims / self.log_temperature.exp().clamp(min=1e-3), dim=1)
        w = 1.0 / (2.0 - 2.0 * sims).clamp(min=1e-6)
        return w / w.sum(1, keepdim=True)

    @auto_move_data
    def predict_batch(self, tensors: dict[str, torch.Tensor], k: int | None = None, weighting: str | None = None) -> dict:
        """Weighted top-``k`` average of the bank's ``log1p`` composition and log library size; the weighted spread of
        the retrieved compositions gives the coefficient of variation ``aux['cv']`` used for the std."""
        z = self.encode_image(tensors[EXPR_KEYS.EMBEDDING_KEY])
        sims, idx = self.retrieve(z, k or self.k)
        w = self.weights(sims, weighting)
        # weighted sums over the retrieved spots as sparse products with the CSR bank (never b × k × G dense)
        mean_log = self.bank_weighted(idx, w, "logcomp")
        comp = torch.expm1(mean_log.clamp(min=0.0))
        scale = comp / comp.sum(-1, keepdim=True).clamp(min=1e-12)
        mean_frac = self.bank_weighted(idx, w, "frac")
        var_frac = (self.bank_weighted(idx, w, "frac2") - mean_frac * mean_frac).clamp(min=0.0)
        cv = var_frac.sqrt() / mean_frac.clamp(min=1e-12)
        log_library = (w * self.bank_loglib[idx]).sum(1)
        return {"scale": scale, "log_library": log_library, "aux": {"cv": cv}}

    def predictive_std(self, mean: torch.Tensor, aux: dict[str, torch.Tensor]) -> torch.Tensor:
        """Weighted spread of the retrieved spots: ``cv × mean`` per gene."""
        return aux["cv"].to(mean.device) * mean
