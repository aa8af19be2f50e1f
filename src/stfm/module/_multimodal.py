"""Torch module of :class:`stfm.model.MultimodalPredictor` (method ``'multimodal'``, after SPAM).

A graph batch (one section or one spatial block) is a dict of tensors:

``x``                (n, d)  spot / cell embeddings
``counts``           (n, G)  counts (zeros for an H&E-only query; training reads them)
``core``             (n,)    1 for the spots the batch is responsible for
``knn_index``        (2, e)  spatial kNN edges within the section (neighbour → spot)
``retrieved``        (n, G)  log1p counts per 10k retrieved from the reference bank (other sections only)
``retrieved_loglib`` (n,)    log library size of the retrieved spots
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
    MLP,
    ReferenceBank,
    Standardize,
    ZINBHead,
    composition_loss,
    edge_attention,
    info_nce,
    log_composition,
    zinb_variance,
)  # fmt: skip

__all__ = ["MultimodalModule"]


class MultimodalModule(ReferenceBank, ExpressionModuleBase):
    """Three encoders aligned by contrast, then cross-attention fusion over neighbour tokens and a ZINB decoder.

    **Stage 1 (``stage='pretrain'``)**: an image encoder (MLP on the embedding), a spatial encoder (two GCN layers on
    the embedding over the kNN graph) and a gene encoder (MLP on ``log1p`` counts per 10k) are trained with
    symmetric InfoNCE between every pair (temperature ``temperature``, SPAM: 0.15).

    **Stage 2 (``stage='fuse'``)**: the gene encoder reads the expression **retrieved** from the reference bank
    (the most similar spots of other sections), never the spot's own: that is what exists at inference, and training
    uses the same. Retrieval runs in the space stage 1 aligned: the query's image embedding (the stage-1 image
    encoder, frozen as :attr:`retrieval_encoder`) against the bank spots' gene embeddings. The spot's token (image ⊕ spatial ⊕ retrieved-gene embeddings ⊕ retrieved depth) attends over
    its neighbours' image tokens (multi-head attention along the kNN edges), and a
    :class:`~stfm.module.ZINBHead` decodes counts with the observed library size in training (a library head for
    queries), plus the composition term of the ZINB model.
    """

    has_std = True

    def __init__(
        self,
        n_input: int,
        n_genes: int,
        *,
        n_latent: int = 128,
        n_hidden: int = 256,
        heads: int = 4,
        dropout_rate: float = 0.2,
        temperature: float = 0.15,
        composition_weight: float = 1.0,
        embedding_mean: np.ndarray | None = None,
        embedding_std: np.ndarray | None = None,
        composition_mean: np.ndarray | None = None,
        composition_std: np.ndarray | None = None,
        log_library_mean: float = 0.0,
    ) -> None:
        super().__init__()
        from torch_geometric.nn import GCNConv

        self.n_genes = int(n_genes)
        self.stage = "pretrain"
        self.heads = int(heads)
        self.dropout = float(dropout_rate)
        self.log_temperature = math.log(temperature)
        self.composition_weight = float(composition_weight)
        self.standardize = Standardize(n_input, embedding_mean, embedding_std)
        self.comp_standardize = Standardize(n_genes, composition_mean, composition_std)
        self.image_encoder = MLP(n_input, n_hidden, 1, n_output=n_latent, dropout=dropout_rate, input_dropout=0.1)
        self.gcn1 = GCNConv(n_input, n_hidden)
        self.gcn2 = GCNConv(n_hidden, n_latent)
        self.gene_encoder = MLP(n_genes, n_hidden, 1, n_output=n_latent, dropout=dropout_rate)
        self.fuse_in = nn.Linear(3 * n_latent + 1, n_latent)
        self.q, self.k, self.v = nn.Linear(n_latent, n_latent), nn.Linear(n_latent, n_latent), nn.Linear(n_latent, n_latent)
        self.norm = nn.LayerNorm(n_latent)
        self.ffn = MLP(n_latent, n_hidden, 1, n_output=n_latent, dropout=dropout_rate)
        self.head = ZINBHead(n_latent, n_genes, log_library_mean=log_library_mean)
        # the stage-1 image encoder, frozen: it embeds queries for retrieval against the bank's gene embeddings
        self.retrieval_encoder = MLP(n_input, n_hidden, 1, n_output=n_latent, dropout=dropout_rate, input_dropout=0.1)
        self.retrieval_encoder.requires_grad_(requires_grad=False)
        self.register_buffer("bank_z", torch.zeros(0, n_latent))
        self._register_bank(n_input, n_genes)


    @torch.no_grad()
    def freeze_retrieval(self, chunk: int = 8192) -> None:
        """After stage 1: copy the image encoder into the frozen retrieval encoder and embed the bank's expression
        with the gene encoder, so queries (image) and bank spots (expression) meet in the aligned space."""
        self.retrieval_encoder.load_state_dict(self.image_encoder.state_dict())
        was = self.training
        self.eval()
        dev = self.bank_loglib.device
        parts = [F.normalize(self.gene_encoder(self.comp_standardize(
                     self.bank_composition(torch.arange(a, min(a + chunk, self.bank_size), device=dev)))), dim=-1)
                 for a in range(0, self.bank_size, chunk)]  # fmt: skip
        self.bank_z = torch.cat(parts) if parts else torch.zeros_like(self.bank_z)
        self.train(was)

    @torch.no_grad()
    def retrieval_keys(self, x: torch.Tensor, space: str) -> torch.Tensor:
        """Unit-norm keys of query embeddings ``x``: the frozen image encoder's output (``'aligned'``, compared
        with :attr:`bank_z`) or the standardised embedding itself (``'embedding'``, compared with the bank's)."""
        was = self.training
        self.eval()
        h = self.standardize(x)
        out = F.normalize(self.retrieval_encoder(h) if space == "aligned" else h, dim=-1)
        self.train(was)
        return out

    def bank_keys(self, space: str) -> torch.Tensor:
        """Unit-norm keys of the bank spots in the retrieval space (see :meth:`retrieval_keys`)."""
        if space == "aligned":
            return self.bank_z
        with torch.no_grad():
            return F.normalize(self.standardize(self.bank_x), dim=-1)

    @property
    def bank_size(self) -> int:
        """Spots in the reference bank."""
        return int(self.bank_x.shape[0])

    # -- encoders --------------------------------------------------------------------------------------------
    def encode(self, g: dict[str, torch.Tensor], gene_input: torch.Tensor) -> dict[str, torch.Tensor]:
        """Image, spatial and gene embeddings of the batch's spots."""
        x = self.standardize(g["x"])
        spatial = self.gcn2(F.gelu(self.gcn1(x, g["knn_index"])), g["knn_index"])
        return {"image": self.image_encoder(x), "spatial": spatial, "gene": self.gene_encoder(self.comp_standardize(gene_input))}

    def fuse(self, g: dict[str, torch.Tensor], z: dict[str, torch.Tensor]) -> torch.Tensor:
        """The spot token (its three embeddings and the retrieved depth) attends over its neighbours' image tokens."""
        lib = (g["retrieved_loglib"].view(-1, 1) - self.head.library_head.bias.detach()).float()
        token = self.fuse_in(torch.cat([z["image"], z["spatial"], z["gene"], lib], dim=-1))
        src, dst = g["knn_index"]
        msg = edge_attention(self.q(token), self.k(z["image"]), self.v(z["image"]), src, dst, token.shape[0],
                             self.heads, self.dropout, self.training)  # fmt: skip
        h = self.norm(token + msg)
        return self.norm(h + self.ffn(h))

    @property
    def predicts_in_stage(self) -> bool:
        """Whether predictions mean anything in the current stage (the decoder trains in stage ``'fuse'`` only)."""
        return self.stage == "fuse"

    # -- scvi interface --------------------------------------------------------------------------------------
    def _get_inference_input(self, tensors):
        return {"graph": tensors}

    def _get_generative_input(self, tensors, inference_outputs):
        return {"h": inference_outputs.get("h"), "library": tensors["counts"].sum(-1, keepdim=True)}

    def inference(self, graph: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stage 1: the three embeddings (the gene encoder on the spot's own expression, training only);
        stage 2: the fused representation (the gene encoder on the retrieved expression)."""
        if self.stage == "pretrain":
            return self.encode(graph, log_composition(graph["counts"]))
        z = self.encode(graph, graph["retrieved"])
        return {"h": self.fuse(graph, z)}

    def generative(self, h: torch.Tensor | None = None, library: torch.Tensor | None = None) -> dict:
        """The ZINB head (stage 2 only)."""
        return {} if h is None else self.head(h, library)

    def loss(self, tensors, inference_outputs, generative_outputs) -> LossOutput:
        """Stage 1: InfoNCE between every pair of encoders; stage 2: ZINB NLL + library + composition terms."""
        core = tensors["core"].bool()
        if self.stage == "pretrain":
            idx = torch.nonzero(core).squeeze(-1)
            if idx.numel() > 512:
                idx = idx[torch.randperm(idx.numel(), device=idx.device)[:512]]
            z = {k: inference_outputs[k][idx] for k in ("image", "spatial", "gene")}
            nce = (info_nce(z["image"], z["gene"], self.log_temperature) + info_nce(z["spatial"], z["gene"], self.log_temperature)
                   + info_nce(z["image"], z["spatial"], self.log_temperature)) / 3  # fmt: skip
            return LossOutput(loss=nce.mean(), reconstruction_loss=nce, n_obs_minibatch=int(idx.numel()))
        x = tensors["counts"][core]
        lib = x.sum(-1, keepdim=True)
        nll = -generative_outputs["px"].log_prob(tensors["counts"])[core].sum(-1)
        lib_loss = 0.5 * (generative_outputs["log_library_pred"][core] - torch.log(lib.clamp(min=1.0))).pow(2).squeeze(-1)
        per = nll + lib_loss
        if self.composition_weight > 0:
            per = per + self.composition_weight * composition_loss(generative_outputs["scale"][core], x, lib)
        return LossOutput(loss=per.mean(), reconstruction_loss=nll, extra_metrics={"library_loss": lib_loss.mean().detach()},
                          n_obs_minibatch=int(core.sum()))  # fmt: skip

    # -- stfm expression-module contract ---------------------------------------------------------------------
    def predict_batch(self, tensors: dict[str, torch.Tensor]) -> dict:
        """Composition and log library size of every spot of a graph batch (no expression of the query is read)."""
        h = self.fuse(tensors, self.encode(tensors, tensors["retrieved"]))
        out = self.head(h)
        return {"scale": out["scale"], "log_library": out["log_library_pred"].squeeze(-1), "aux": {"zi_logits": out["zi_logits"]}}

    def predictive_std(self, mean: torch.Tensor, aux: dict[str, torch.Tensor]) -> torch.Tensor:
        """ZINB standard deviation at mean ``mean``."""
        theta = torch.exp(self.head.log_theta).to(mean.device)
        return torch.sqrt(zinb_variance(mean, theta, torch.sigmoid(aux["zi_logits"].to(mean.device))))
