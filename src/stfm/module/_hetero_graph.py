"""Torch module of :class:`stfm.model.HeteroGraphPredictor` (method ``'hetero_graph'``, after SpaHGC).

A graph batch is a plain dict of tensors (one target section, or one spatial block of it, with the reference
spots linked to it), built by the model from the spatial layer; no AnnData inside:

``target_x``      (n_t, d)  embeddings of the target spots
``target_counts`` (n_t, G)  their counts (zeros for an H&E-only query; only training reads them)
``target_core``   (n_t,)    1 for the spots the batch is responsible for (a block's core), 0 for its halo
``ref_x``         (n_r, d)  embeddings of the linked reference spots
``ref_logcomp``   (n_r, G)  their measured log1p counts per 10k
``ref_loglib``    (n_r,)    their log library size
``tt_index``      (2, e)    target → target spatial edges (source, destination)
``rr_index``      (2, e)    reference → reference similarity edges
``rt_index``      (2, e)    reference → target links (reference row, target row)
``rt_sim``        (e,)      cosine similarity of each link
``ref_section``   (n_r,)    bank section code of each reference spot (for checks; the network does not read it)
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scvi.module.base import LossOutput
from torch import nn

from ._base import ExpressionModuleBase
from ._components import (
    ReferenceBank,
    Standardize,
    ZINBHead,
    composition_loss,
    edge_attention,
    info_nce,
    log_composition,
    zinb_variance,
)  # fmt: skip

__all__ = ["BiAttention", "HeteroGraphModule"]


class BiAttention(nn.Module):
    """Bidirectional target ↔ reference attention along the links (SpaHGC's CNDA, without its bugs).

    Target spots attend over the reference spots linked to them (queries from targets, keys / values from
    references); reference spots attend over the targets linked to them. Returns the two messages.
    """

    def __init__(self, d: int, heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        if d % heads:
            msg = f"`n_hidden` ({d}) must be divisible by `heads` ({heads})."
            raise ValueError(msg)
        self.heads, self.dropout = heads, dropout
        self.q_t, self.k_r, self.v_r = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.q_r, self.k_t, self.v_t = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, h_t: torch.Tensor, h_r: torch.Tensor, rt_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ref, tgt = rt_index
        to_t = edge_attention(self.q_t(h_t), self.k_r(h_r), self.v_r(h_r), ref, tgt, h_t.shape[0], self.heads, self.dropout, self.training)
        to_r = edge_attention(self.q_r(h_r), self.k_t(h_t), self.v_t(h_t), tgt, ref, h_r.shape[0], self.heads, self.dropout, self.training)
        return to_t, to_r


class _Layer(nn.Module):
    """One round: SAGE within targets and within references, bidirectional attention between them; residual + norm."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        from torch_geometric.nn import SAGEConv

        self.sage_t = SAGEConv(d, d)
        self.sage_r = SAGEConv(d, d)
        self.cross = BiAttention(d, heads, dropout)
        self.norm_t, self.norm_r = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(self, h_t, h_r, tt, rr, rt):
        m_t, m_r = self.cross(h_t, h_r, rt)
        u_t = self.sage_t(h_t, tt) + m_t
        u_r = self.sage_r(h_r, rr) + m_r
        return self.norm_t(h_t + self.drop(F.gelu(u_t))), self.norm_r(h_r + self.drop(F.gelu(u_r)))


class HeteroGraphModule(ReferenceBank, ExpressionModuleBase):
    """Heterogeneous graph network over target spots and the reference spots of other sections (after SpaHGC).

    Inputs: target nodes carry their (standardised) embedding; reference nodes their embedding ⊕ their measured
    ``log1p`` composition. ``n_layers`` rounds of :class:`_Layer` (SAGE on target–target spatial edges and on
    reference–reference similarity edges, bidirectional attention along target ↔ reference links), then
    attention pooling of each target's linked references (similarity-weighted keys) and a head:

    ``loss='zinb'`` (default, as every stfm expression model): :class:`~stfm.module.ZINBHead` on counts with the
    observed library size in training and a library head for queries, plus the composition term of the ZINB
    model (``composition_weight``). ``loss='mse_pcc'`` (SpaHGC's): the head
    predicts ``log1p`` counts per 10k and the log library size; MSE + 0.5 · (1 − Pearson per gene) on the former,
    MSE on the latter.

    Masked-view contrast (``contrastive_weight``): a view with random feature masks (``mask_target``,
    ``mask_reference``) is encoded and its target embeddings are pulled towards those of the unmasked graph with
    InfoNCE (other targets are the negatives), so the encoder does not lean on single features. Predictions always
    use the unmasked graph. Graphs with more than ``checkpoint_edges`` links recompute each layer in the backward
    pass (gradient checkpointing), so training memory stays near inference memory.

    The reference bank (embeddings, log compositions, log library sizes and section codes of the training spots)
    is held as buffers and saved with the model.
    """

    has_std = True

    def __init__(
        self,
        n_input: int,
        n_genes: int,
        *,
        n_hidden: int = 256,
        n_layers: int = 4,
        heads: int = 4,
        dropout_rate: float = 0.2,
        loss: str = "zinb",
        composition_weight: float = 1.0,
        contrastive_weight: float = 0.1,
        mask_target: float = 0.2,
        mask_reference: float = 0.5,
        temperature: float = 0.5,
        checkpoint_edges: int = 20_000,
        embedding_mean: np.ndarray | None = None,
        embedding_std: np.ndarray | None = None,
        composition_mean: np.ndarray | None = None,
        composition_std: np.ndarray | None = None,
        log_library_mean: float = 0.0,
    ) -> None:
        super().__init__()
        if loss not in ("zinb", "mse_pcc"):
            msg = f"Expected `loss` to be 'zinb' or 'mse_pcc', found {loss!r}."
            raise ValueError(msg)
        self.loss_kind = loss
        self.n_genes = int(n_genes)
        self.composition_weight = float(composition_weight)
        self.contrastive_weight = float(contrastive_weight)
        self.mask_target, self.mask_reference = float(mask_target), float(mask_reference)
        self.log_temperature = math.log(temperature)
        self.checkpoint_edges = int(checkpoint_edges)
        self.standardize = Standardize(n_input, embedding_mean, embedding_std)
        self.comp_standardize = Standardize(n_genes, composition_mean, composition_std)
        self.target_in = nn.Sequential(nn.Linear(n_input, n_hidden), nn.LayerNorm(n_hidden), nn.GELU())
        self.ref_in = nn.Sequential(nn.Linear(n_input + n_genes, n_hidden), nn.LayerNorm(n_hidden), nn.GELU())
        self.layers = nn.ModuleList(_Layer(n_hidden, heads, dropout_rate) for _ in range(int(n_layers)))
        self.pool = BiAttention(n_hidden, heads, dropout_rate)
        self.sim_gate = nn.Linear(1, 1)
        self.out_norm = nn.LayerNorm(n_hidden)
        self.project = nn.Linear(n_hidden, n_hidden)  # contrastive projection
        if loss == "zinb":
            self.head = ZINBHead(n_hidden, n_genes, log_library_mean=log_library_mean)
        else:
            self.comp_head = nn.Linear(n_hidden, n_genes)
            self.lib_head = nn.Linear(n_hidden, 1)
            nn.init.zeros_(self.lib_head.weight)
            nn.init.constant_(self.lib_head.bias, float(log_library_mean))
        self._register_bank(n_input, n_genes)

    # -- bank ------------------------------------------------------------------------------------------------
    @property
    def bank_size(self) -> int:
        """Spots in the reference bank."""
        return int(self.bank_x.shape[0])

    # -- encoder ---------------------------------------------------------------------------------------------
    def _encode(self, g: dict[str, torch.Tensor], mask: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: FBT001, FBT002
        xt = self.standardize(g["target_x"])
        xr = torch.cat([self.standardize(g["ref_x"]), self.comp_standardize(g["ref_logcomp"])], dim=-1)
        if mask:
            xt = xt * (torch.rand_like(xt) >= self.mask_target)
            xr = xr * (torch.rand_like(xr) >= self.mask_reference)
        h_t, h_r = self.target_in(xt), self.ref_in(xr)
        # large graphs in training: recompute each layer in the backward pass instead of keeping its activations
        ckpt = self.training and torch.is_grad_enabled() and g["rt_index"].shape[1] > self.checkpoint_edges
        for layer in self.layers:
            if ckpt:
                from torch.utils.checkpoint import checkpoint

                h_t, h_r = checkpoint(layer, h_t, h_r, g["tt_index"], g["rr_index"], g["rt_index"], use_reentrant=False)
            else:
                h_t, h_r = layer(h_t, h_r, g["tt_index"], g["rr_index"], g["rt_index"])
        return h_t, h_r

    def _pooled(self, g: dict[str, torch.Tensor], h_t: torch.Tensor, h_r: torch.Tensor) -> torch.Tensor:
        """Attention pooling of each target's linked references, their similarity gating the values."""
        gate = torch.sigmoid(self.sim_gate(g["rt_sim"].view(-1, 1).float()))
        ref, tgt = g["rt_index"]
        pooled = edge_attention(self.pool.q_t(h_t), self.pool.k_r(h_r), self.pool.v_r(h_r), ref, tgt, h_t.shape[0],
                         self.pool.heads, self.pool.dropout, self.training, edge_weight=gate)  # fmt: skip
        return self.out_norm(h_t + pooled)

    # -- scvi interface --------------------------------------------------------------------------------------
    def _get_inference_input(self, tensors):
        return {"graph": tensors}

    def _get_generative_input(self, tensors, inference_outputs):
        lib = tensors["target_counts"].sum(-1, keepdim=True)
        return {"h": inference_outputs["h"], "library": lib}

    def inference(self, graph: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Target representations from the unmasked graph (and two masked views in training)."""
        h_t, h_r = self._encode(graph)
        out = {"h": self._pooled(graph, h_t, h_r), "h_target": h_t}
        if self.training and self.contrastive_weight > 0:
            out["view"], _ = self._encode(graph, mask=True)
        return out

    def generative(self, h: torch.Tensor, library: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The head: ZINB parameters, or log composition and log library size (``loss='mse_pcc'``)."""
        if self.loss_kind == "zinb":
            return self.head(h, library)
        logcomp = self.comp_head(h)
        return {"logcomp": logcomp, "log_library_pred": self.lib_head(h)}

    def loss(self, tensors, inference_outputs, generative_outputs) -> LossOutput:
        """ZINB NLL (or MSE + 0.5 (1 − PCC)) on the core target spots + log-library loss + masked-view InfoNCE."""
        core = tensors["target_core"].bool()
        x = tensors["target_counts"][core]
        lib = x.sum(-1, keepdim=True)
        log_lib = torch.log(lib.clamp(min=1.0))
        extra = {}
        if self.loss_kind == "zinb":
            px = generative_outputs["px"]
            full = px.log_prob(tensors["target_counts"])
            rec = -full[core].sum(-1)
            lib_loss = 0.5 * (generative_outputs["log_library_pred"][core] - log_lib).pow(2).squeeze(-1)
            per = rec + lib_loss
            if self.composition_weight > 0:
                comp = composition_loss(generative_outputs["scale"][core], x, lib)
                per = per + self.composition_weight * comp
                extra["composition_loss"] = comp.mean().detach()
        else:
            obs = log_composition(x, lib)
            pred = generative_outputs["logcomp"][core]
            mse = (pred - obs).pow(2).mean(-1)
            pc, oc = pred - pred.mean(0), obs - obs.mean(0)
            pcc = (pc * oc).sum(0) / ((pc.pow(2).sum(0) * oc.pow(2).sum(0)).sqrt() + 1e-8)
            lib_loss = 0.5 * (generative_outputs["log_library_pred"][core] - log_lib).pow(2).squeeze(-1)
            rec = mse
            per = mse + 0.5 * (1 - pcc.mean()) + lib_loss
        total = per.mean()
        if "view" in inference_outputs:
            v1, v2 = inference_outputs["h_target"][core], inference_outputs["view"][core]
            if v1.shape[0] > 512:
                pick = torch.randperm(v1.shape[0], device=v1.device)[:512]
                v1, v2 = v1[pick], v2[pick]
            nce = info_nce(self.project(v1), self.project(v2), self.log_temperature).mean()
            total = total + self.contrastive_weight * nce
            extra["contrastive"] = nce.detach()
        extra["library_loss"] = lib_loss.mean().detach()
        return LossOutput(loss=total, reconstruction_loss=rec, extra_metrics=extra, n_obs_minibatch=int(core.sum()))

    # -- stfm expression-module contract ---------------------------------------------------------------------
    def predict_batch(self, tensors: dict[str, torch.Tensor]) -> dict:
        """Composition and log library size of every target spot of a graph batch (ZINB logits for the std)."""
        h_t, h_r = self._encode(tensors)
        h = self._pooled(tensors, h_t, h_r)
        if self.loss_kind == "zinb":
            out = self.head(h)
            return {"scale": out["scale"], "log_library": out["log_library_pred"].squeeze(-1),
                    "aux": {"zi_logits": out["zi_logits"]}}  # fmt: skip
        comp = torch.expm1(self.comp_head(h).clamp(min=0.0))
        scale = comp / comp.sum(-1, keepdim=True).clamp(min=1e-12)
        return {"scale": scale, "log_library": self.lib_head(h).squeeze(-1),
                "aux": {"zi_logits": torch.full_like(scale, -30.0)}}  # fmt: skip

    def predictive_std(self, mean: torch.Tensor, aux: dict[str, torch.Tensor]) -> torch.Tensor:
        """ZINB standard deviation (``loss='zinb'``); for ``'mse_pcc'`` a Poisson one, sqrt(mean)."""
        if self.loss_kind != "zinb":
            return mean.clamp(min=0).sqrt()
        theta = torch.exp(self.head.log_theta).to(mean.device)
        return torch.sqrt(zinb_variance(mean, theta, torch.sigmoid(aux["zi_logits"].to(mean.device))))

    @torch.inference_mode()
    def sample(self, tensors: dict[str, torch.Tensor], n_samples: int = 1) -> torch.Tensor:
        """Draws from the fitted distribution at the predicted library size (Poisson for ``'mse_pcc'``)."""
        out = self.predict_batch(tensors)
        mean = out["scale"] * torch.exp(out["log_library"]).unsqueeze(-1)
        if self.loss_kind == "zinb":
            from scvi.distributions import ZeroInflatedNegativeBinomial

            theta = torch.exp(self.head.log_theta).expand_as(mean)
            draws = ZeroInflatedNegativeBinomial(mu=mean, theta=theta, zi_logits=out["aux"]["zi_logits"]).sample((n_samples,))
        else:
            draws = torch.poisson(mean.expand(n_samples, *mean.shape))
        return draws[0] if n_samples == 1 else draws
