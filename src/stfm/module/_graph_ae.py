"""Torch module of :class:`stfm.model.GraphAEPredictor` (method ``'graph_ae'``, after HESpotEx).

A graph batch is a dict of tensors (one section, or one spatial block of it):

``x``          (n, d)  spot embeddings (⊕ nuclei features, when the model uses them)
``counts``     (n, G)  counts (zeros for an H&E-only query; only training reads them)
``core``       (n,)    1 for the spots the batch is responsible for, 0 for its halo
``edge_index`` (2, e)  spatial edges within the section (source, destination)
``latent``     (n, L)  the stage-1 autoencoder's latent of each spot (stage 2 only)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scvi.module.base import LossOutput
from torch import nn

from ._base import ExpressionModuleBase
from ._components import MLP, Standardize, ZINBHead, composition_loss, log_composition, zinb_variance

__all__ = ["GraphAEModule"]


def pearson_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 − mean Pearson`` between matching columns of ``a`` and ``b`` (each latent dimension across spots)."""
    a, b = a - a.mean(0), b - b.mean(0)
    r = (a * b).sum(0) / ((a.pow(2).sum(0) * b.pow(2).sum(0)).sqrt() + 1e-8)
    return 1 - r.mean()


class GraphAEModule(ExpressionModuleBase):
    """Two stages, after HESpotEx.

    **Stage 1 (``stage='autoencoder'``)**: a STAGATE-style graph-attention autoencoder on the training sections'
    expression (standardised ``log1p`` counts per 10k) over the spatial graph: two GAT layers down to an
    ``n_latent``-dimensional latent, two up again; loss = mean squared reconstruction error.

    **Stage 2 (``stage='image'``)**: the autoencoder is frozen. An image encoder (MLP on the standardised
    embedding, optionally ⊕ nuclei features) predicts each spot's latent, aligned to the autoencoder's with
    ``1 − Pearson`` (``align_weight``). The decoder runs ``n_decoder`` parallel GraphSAGE layers on that latent over
    the spatial graph, merges them with LSTM jumping knowledge (mean over the layer sequence) plus a linear path, and
    ends in a :class:`~stfm.module.ZINBHead` on counts with the observed library size (a library head for queries)
    and the composition term of the ZINB model. Only the image path runs at inference: a query needs an embedding
    and coordinates, never expression.
    """

    has_std = True

    def __init__(
        self,
        n_input: int,
        n_genes: int,
        *,
        n_latent: int = 64,
        n_hidden_ae: int = 512,
        n_hidden: int = 256,
        n_decoder: int = 4,
        dropout_rate: float = 0.2,
        align_weight: float = 1.0,
        composition_weight: float = 1.0,
        embedding_mean: np.ndarray | None = None,
        embedding_std: np.ndarray | None = None,
        composition_mean: np.ndarray | None = None,
        composition_std: np.ndarray | None = None,
        log_library_mean: float = 0.0,
    ) -> None:
        super().__init__()
        from torch_geometric.nn import GATConv, SAGEConv

        self.n_genes = int(n_genes)
        self.stage = "autoencoder"
        self.align_weight = float(align_weight)
        self.composition_weight = float(composition_weight)
        self.standardize = Standardize(n_input, embedding_mean, embedding_std)
        self.comp_standardize = Standardize(n_genes, composition_mean, composition_std)
        # stage 1: graph-attention autoencoder
        self.enc1 = GATConv(n_genes, n_hidden_ae, heads=1, add_self_loops=True)
        self.enc2 = GATConv(n_hidden_ae, n_latent, heads=1, add_self_loops=True)
        self.dec1 = GATConv(n_latent, n_hidden_ae, heads=1, add_self_loops=True)
        self.dec2 = GATConv(n_hidden_ae, n_genes, heads=1, add_self_loops=True)
        # stage 2: image encoder, GraphSAGE decoder with LSTM jumping knowledge, ZINB head
        self.image_encoder = MLP(n_input, n_hidden, 1, n_output=n_latent, dropout=dropout_rate, input_dropout=0.1)
        self.sage = nn.ModuleList(SAGEConv(n_latent, n_latent) for _ in range(int(n_decoder)))
        self.jk = nn.LSTM(n_latent, n_hidden, num_layers=2, batch_first=False)
        self.linear_path = nn.Linear(n_latent, n_hidden)
        self.norm = nn.LayerNorm(n_hidden)
        self.drop = nn.Dropout(dropout_rate)
        self.head = ZINBHead(n_hidden, n_genes, log_library_mean=log_library_mean)

    # -- pieces ----------------------------------------------------------------------------------------------
    def autoencode(self, counts: torch.Tensor, edge_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latent, reconstruction, standardised input) of the stage-1 autoencoder."""
        x = self.comp_standardize(log_composition(counts))
        z = self.enc2(F.elu(self.enc1(x, edge_index)), edge_index)
        rec = self.dec2(F.elu(self.dec1(z, edge_index)), edge_index)
        return z, rec, x

    def image_latent(self, x: torch.Tensor) -> torch.Tensor:
        """The latent predicted from the (standardised) embedding."""
        return self.image_encoder(self.standardize(x))

    def decode(self, z: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Parallel GraphSAGE layers merged by an LSTM over the layer sequence (jumping knowledge) + a linear path."""
        seq = torch.stack([F.normalize(F.relu(conv(z, edge_index)), dim=-1) for conv in self.sage])  # (n_dec, n, L)
        jk, _ = self.jk(seq)
        return self.norm(self.drop(jk.mean(0)) + self.linear_path(z))

    @property
    def predicts_in_stage(self) -> bool:
        """Whether predictions mean anything in the current stage (the decoder trains in stage ``'image'`` only)."""
        return self.stage == "image"

    # -- scvi interface --------------------------------------------------------------------------------------
    def _get_inference_input(self, tensors):
        return {"graph": tensors}

    def _get_generative_input(self, tensors, inference_outputs):
        return {"h": inference_outputs.get("h"), "library": tensors["counts"].sum(-1, keepdim=True)}

    def inference(self, graph: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stage 1: the autoencoder pass; stage 2: image latent and decoder state."""
        if self.stage == "autoencoder":
            z, rec, x = self.autoencode(graph["counts"], graph["edge_index"])
            return {"z": z, "reconstruction": rec, "target": x}
        z = self.image_latent(graph["x"])
        return {"z": z, "h": self.decode(z, graph["edge_index"])}

    def generative(self, h: torch.Tensor | None = None, library: torch.Tensor | None = None) -> dict:
        """The ZINB head (stage 2 only)."""
        return {} if h is None else self.head(h, library)

    def loss(self, tensors, inference_outputs, generative_outputs) -> LossOutput:
        """Stage 1: reconstruction MSE; stage 2: ZINB NLL + library + composition + alignment (1 − Pearson)."""
        core = tensors["core"].bool()
        if self.stage == "autoencoder":
            err = (inference_outputs["reconstruction"] - inference_outputs["target"]).pow(2).mean(-1)[core]
            return LossOutput(loss=err.mean(), reconstruction_loss=err, n_obs_minibatch=int(core.sum()))
        x = tensors["counts"][core]
        lib = x.sum(-1, keepdim=True)
        nll = -generative_outputs["px"].log_prob(tensors["counts"])[core].sum(-1)
        lib_loss = 0.5 * (generative_outputs["log_library_pred"][core] - torch.log(lib.clamp(min=1.0))).pow(2).squeeze(-1)
        per = nll + lib_loss
        extra = {"library_loss": lib_loss.mean().detach()}
        if self.composition_weight > 0:
            comp = composition_loss(generative_outputs["scale"][core], x, lib)
            per = per + self.composition_weight * comp
        total = per.mean()
        if self.align_weight > 0 and "latent" in tensors:
            align = pearson_loss(inference_outputs["z"][core], tensors["latent"][core])
            total = total + self.align_weight * align
            extra["alignment"] = align.detach()
        return LossOutput(loss=total, reconstruction_loss=nll, extra_metrics=extra, n_obs_minibatch=int(core.sum()))

    # -- stfm expression-module contract ---------------------------------------------------------------------
    def predict_batch(self, tensors: dict[str, torch.Tensor]) -> dict:
        """Composition and log library size of every spot of a graph batch, from the image path only."""
        z = self.image_latent(tensors["x"])
        out = self.head(self.decode(z, tensors["edge_index"]))
        return {"scale": out["scale"], "log_library": out["log_library_pred"].squeeze(-1), "aux": {"zi_logits": out["zi_logits"]}}

    def predictive_std(self, mean: torch.Tensor, aux: dict[str, torch.Tensor]) -> torch.Tensor:
        """ZINB standard deviation at mean ``mean``."""
        theta = torch.exp(self.head.log_theta).to(mean.device)
        return torch.sqrt(zinb_variance(mean, theta, torch.sigmoid(aux["zi_logits"].to(mean.device))))

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        """Parameters of stage 1 (frozen in stage 2)."""
        return [p for m in (self.enc1, self.enc2, self.dec1, self.dec2) for p in m.parameters()]
