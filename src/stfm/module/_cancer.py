"""Torch module of :class:`stfm.model.CancerClassifier`: attention fusion of image, expression and context tokens."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from ._components import MLP, Standardize, info_nce, init_log_temperature

__all__ = ["TENSOR_KEYS", "CancerModule"]


class TENSOR_KEYS:
    """Registry keys of the tensors :class:`CancerModule` reads (set by ``CancerClassifier.setup_anndata``)."""

    IMAGE = "image"
    IMAGE_CTX = "image_ctx"
    IMAGE_MASK = "image_ctx_mask"
    HAS_IMAGE = "has_image"
    EXPR = "expression"
    EXPR_CTX = "expression_ctx"
    EXPR_MASK = "expression_ctx_mask"
    HAS_EXPR = "has_expression"
    LABEL = "cancer_label"


class _ModalityEncoder(nn.Module):
    """Standardise (reference mean / std buffers), then project an embedding to ``d_model``."""

    def __init__(self, n_input: int, d_model: int, dropout: float) -> None:
        super().__init__()
        self.standardize = Standardize(n_input)
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(n_input, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.drop(self.standardize(x)))


class _FusionNet(nn.Module):
    """One member: modality projections, learned [CLS] and slot embeddings, transformer encoder, classifier head."""

    def __init__(self, n_image: int, n_expression: int, n_context: int, *, d_model: int, n_heads: int, n_layers: int,
                 dropout: float, learn_temperature: bool) -> None:  # fmt: skip
        super().__init__()
        self.n_context = int(n_context)
        self.image_encoder = _ModalityEncoder(n_image, d_model, dropout) if n_image > 0 else None
        self.expr_encoder = _ModalityEncoder(n_expression, d_model, dropout) if n_expression > 0 else None
        # slots: 0 cls, 1 image self, 2 expression self, 3.. image context, then expression context
        self.n_tokens = 3 + 2 * self.n_context
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
        self.position = nn.Parameter(torch.randn(1, self.n_tokens, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, dim_feedforward=2 * d_model, dropout=dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = MLP(d_model, d_model, 1, n_output=1, dropout=dropout, layer_norm=False)
        if n_image > 0 and n_expression > 0:
            self.image_contrast = nn.Linear(d_model, d_model)
            self.expr_contrast = nn.Linear(d_model, d_model)
        else:
            self.image_contrast = self.expr_contrast = None
        self.log_temperature = init_log_temperature(0.07, learn=learn_temperature)

    def _side(self, enc, x, ctx, ctx_mask, has, n_batch, device):
        d_model = self.cls.shape[-1]
        if enc is None or x is None:
            tokens = torch.zeros(n_batch, 1 + self.n_context, d_model, device=device)
            present = torch.zeros(n_batch, 1 + self.n_context, dtype=torch.bool, device=device)
            return tokens, present, None
        has = has.reshape(-1) > 0.5
        own = enc(x).unsqueeze(1)
        if self.n_context > 0:
            ctx = ctx.reshape(n_batch, self.n_context, -1)
            ctx_tokens = enc(ctx)
            ctx_present = ctx_mask > 0.5
            tokens = torch.cat([own, ctx_tokens], dim=1)
            present = torch.cat([has.unsqueeze(1), ctx_present], dim=1)
        else:
            tokens, present = own, has.unsqueeze(1)
        return tokens, present, own.squeeze(1)

    def forward(self, image, image_ctx, image_ctx_mask, has_image, expression, expression_ctx, expression_ctx_mask,
                has_expression, *, modality_dropout: float) -> dict[str, torch.Tensor]:  # fmt: skip
        ref = image if image is not None else expression
        n_batch, device = ref.shape[0], ref.device
        img_tok, img_present, img_own = self._side(self.image_encoder, image, image_ctx, image_ctx_mask, has_image, n_batch, device)
        exp_tok, exp_present, exp_own = self._side(self.expr_encoder, expression, expression_ctx, expression_ctx_mask, has_expression, n_batch, device)
        both = img_present[:, 0] & exp_present[:, 0]
        if self.training and modality_dropout > 0:
            u = torch.rand(n_batch, device=device)
            drop_img = both & (u < modality_dropout / 2)
            drop_exp = both & (u >= modality_dropout / 2) & (u < modality_dropout)
            img_present = img_present & ~drop_img.unsqueeze(1)
            exp_present = exp_present & ~drop_exp.unsqueeze(1)
        # order: cls, image self, expression self, image context, expression context
        tokens = torch.cat(
            [self.cls.expand(n_batch, -1, -1), img_tok[:, :1], exp_tok[:, :1], img_tok[:, 1:], exp_tok[:, 1:]], dim=1
        ) + self.position
        present = torch.cat(
            [torch.ones(n_batch, 1, dtype=torch.bool, device=device), img_present[:, :1], exp_present[:, :1],
             img_present[:, 1:], exp_present[:, 1:]], dim=1,
        )  # fmt: skip
        hidden = self.encoder(tokens, src_key_padding_mask=~present)
        logit = self.head(self.norm(hidden[:, 0])).squeeze(-1)
        return {"logit": logit, "image_own": img_own, "expression_own": exp_own, "both": both}

    def info_nce(self, img: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
        return info_nce(self.image_contrast(img), self.expr_contrast(exp), self.log_temperature)


class CancerModule(BaseModuleClass):
    """Transformer fusion over real tokens, BCE + InfoNCE(image ↔ expression), optionally an ensemble.

    Tokens of one spot: a learned ``[CLS]`` token; the spot's own image and expression embeddings; the
    pooled context tokens of each modality (one per scale ring × angular sector, see
    :func:`stfm.graph.pool_context`). Each token gets a learned position embedding saying which slot
    it is (modality, self/ring, sector). A small transformer encoder attends over the tokens with a padding
    mask: a modality the spot lacks, or a context bin without neighbours, is masked out, never zero-filled.
    The ``[CLS]`` output feeds the classifier.

    With ``n_members > 1`` the module holds that many such networks, each with its own initialisation and
    dropout draws, trained side by side on the same minibatches (the loss is the mean of the members'
    losses, so their gradients do not mix); the logit is the mean of the members' logits. Small reference
    sets give unstable single models; the mean over members is steadier.

    Training extras: *modality dropout* (for a spot with both modalities, the whole image or the whole
    expression side is masked with probability ``modality_dropout / 2`` each), so that either modality may
    be missing at inference; and InfoNCE between the projected image and expression embeddings of the spots
    that have both (learnable temperature, initialised at 0.07).

    Parameters
    ----------
    n_image
        Image embedding dimension (0 = the model has no image side).
    n_expression
        Expression embedding dimension (0 = no expression side).
    n_context
        Number of context tokens per modality (scales × sectors; 0 = no context).
    d_model
        Token width.
    n_heads
        Attention heads.
    n_layers
        Transformer encoder layers.
    dropout
        Dropout inside the encoder and on the inputs.
    modality_dropout
        Probability, per training spot with both modalities, of masking one of them.
    contrastive_weight
        λ of the InfoNCE term.
    pos_weight
        Weight of the positive class in the BCE (``n_negative / n_positive`` of the training labels balances them).
    learn_temperature
        Learn the InfoNCE temperature (else fixed at 0.07).
    n_members
        Number of networks in the ensemble (1 = a single model).
    """

    def __init__(
        self,
        n_image: int,
        n_expression: int,
        n_context: int,
        *,
        d_model: int = 32,
        n_heads: int = 4,
        n_layers: int = 2,
        dropout: float = 0.3,
        modality_dropout: float = 0.3,
        contrastive_weight: float = 0.1,
        pos_weight: float = 1.0,
        learn_temperature: bool = True,
        n_members: int = 1,
    ) -> None:
        super().__init__()
        if n_image <= 0 and n_expression <= 0:
            msg = "CancerModule needs at least one modality: `n_image` or `n_expression` must be > 0."
            raise ValueError(msg)
        if int(n_members) < 1:
            msg = f"Expected `n_members` >= 1, found {n_members!r}."
            raise ValueError(msg)
        self.n_image = int(n_image)
        self.n_expression = int(n_expression)
        self.n_context = int(n_context)
        self.modality_dropout = float(modality_dropout)
        self.contrastive_weight = float(contrastive_weight)
        self.register_buffer("pos_weight", torch.tensor(float(pos_weight)))
        self.members = nn.ModuleList(
            _FusionNet(n_image, n_expression, n_context, d_model=d_model, n_heads=n_heads, n_layers=n_layers,
                       dropout=dropout, learn_temperature=learn_temperature)
            for _ in range(int(n_members))
        )

    @property
    def n_members(self) -> int:
        """Number of networks in the ensemble."""
        return len(self.members)

    def set_standardisation(self, *, image: tuple | None = None, expression: tuple | None = None) -> None:
        """Store the reference mean / std of each embedding (applied before the projections of every member)."""
        for member in self.members:
            for enc, stats in ((member.image_encoder, image), (member.expr_encoder, expression)):
                if enc is not None and stats is not None:
                    enc.standardize.set(*stats)

    # -- scvi-tools module interface -----------------------------------------------------------------
    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        return {k: tensors.get(k) for k in (
            TENSOR_KEYS.IMAGE, TENSOR_KEYS.IMAGE_CTX, TENSOR_KEYS.IMAGE_MASK, TENSOR_KEYS.HAS_IMAGE,
            TENSOR_KEYS.EXPR, TENSOR_KEYS.EXPR_CTX, TENSOR_KEYS.EXPR_MASK, TENSOR_KEYS.HAS_EXPR,
        )}  # fmt: skip

    def _get_generative_input(self, tensors, inference_outputs) -> dict:
        return {}

    @auto_move_data
    def inference(
        self,
        image=None,
        image_ctx=None,
        image_ctx_mask=None,
        has_image=None,
        expression=None,
        expression_ctx=None,
        expression_ctx_mask=None,
        has_expression=None,
    ) -> dict[str, Any]:
        """Logit per spot (mean over members) from the attention-fused tokens, plus what the losses need."""
        ref = image if image is not None else expression
        ones = torch.ones(ref.shape[0], 1, device=ref.device)
        has_image = ones if has_image is None else has_image
        has_expression = ones if has_expression is None else has_expression
        outs = [
            m(image, image_ctx, image_ctx_mask, has_image, expression, expression_ctx, expression_ctx_mask,
              has_expression, modality_dropout=self.modality_dropout)
            for m in self.members
        ]
        member_logits = torch.stack([o["logit"] for o in outs])
        return {"logit": member_logits.mean(0), "member_logits": member_logits, "members": outs}

    def generative(self, **kwargs) -> dict:
        """No generative model: the classifier is discriminative."""
        return {}

    def loss(self, tensors, inference_outputs, generative_outputs) -> LossOutput:
        """Per member: BCE (class-weighted) + λ · InfoNCE, per spot; the mean over members and minibatch is optimised."""
        y = tensors[TENSOR_KEYS.LABEL].reshape(-1).float()
        valid = torch.isfinite(y)
        target = torch.where(valid, y, torch.zeros_like(y))
        per_spot = torch.zeros_like(y)
        nces = []
        for member, out in zip(self.members, inference_outputs["members"]):
            term = F.binary_cross_entropy_with_logits(
                out["logit"], target, pos_weight=self.pos_weight, reduction="none"
            ) * valid.float()
            both = out["both"]
            if member.image_contrast is not None and int(both.sum()) >= 2:
                nce = torch.zeros_like(term)
                nce[both] = member.info_nce(out["image_own"][both], out["expression_own"][both])
                term = term + self.contrastive_weight * nce
                nces.append(nce[both].mean().detach())
            per_spot = per_spot + term / self.n_members
        extra = {"info_nce": torch.stack(nces).mean()} if nces else {}
        loss = per_spot.sum() / valid.sum().clamp(min=1)
        return LossOutput(loss=loss, reconstruction_loss=per_spot, extra_metrics=extra)

    @torch.inference_mode()
    def sample(self, tensors, n_samples: int = 1) -> torch.Tensor:
        """Bernoulli draws of the tumour label from the predicted probabilities."""
        inference_outputs, _ = self.forward(tensors, compute_loss=False)
        p = torch.sigmoid(inference_outputs["logit"])
        return torch.bernoulli(p.expand(n_samples, -1))
