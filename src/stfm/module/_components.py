"""Torch building blocks shared by stfm's modules (scVIVA keeps its ``_components.py`` beside the module, so do we).

- :class:`Standardize`: fixed per-dimension standardisation (training statistics stored as buffers).
- :class:`MLP`: Linear → LayerNorm → GELU → Dropout blocks, the encoder of every embedding-driven model.
- :class:`ZINBHead`: hidden state → zero-inflated negative binomial over a gene panel with a library size
  (normalised mean ``scale``, zero-inflation logits, a library size predicted from the image, gene-wise ``theta``).
- :func:`info_nce`: symmetric InfoNCE between two batches of embeddings (CLIP / BLEEP / SpaCancer / SPAM).
- :class:`CrossAttentionBlock`: pre-norm cross-attention of query tokens over key/value tokens with padding masks.
- :func:`edge_attention`: multi-head attention of graph nodes over their neighbours along an edge list.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse
from scvi.distributions import ZeroInflatedNegativeBinomial
from torch import nn

from .._rows import CountRows, csr_rows_torch, log_composition_csr

__all__ = [
    "MLP",
    "CrossAttentionBlock",
    "Standardize",
    "ZINBHead",
    "composition_loss",
    "edge_attention",
    "info_nce",
    "init_log_temperature",
    "log_composition",
    "segment_softmax",
    "zinb_variance",
]


def log_composition(x: torch.Tensor, lib: torch.Tensor | None = None) -> torch.Tensor:
    """``log1p`` counts per 10k over the panel (``lib``: the rows' totals, summed from ``x`` when not given; floored
    at 1); the torch twin of :func:`stfm._rows.log_normalise`."""
    if lib is None:
        lib = x.sum(-1, keepdim=True)
    return torch.log1p(x / lib.clamp(min=1.0) * 1e4)


def composition_loss(scale: torch.Tensor, x: torch.Tensor, lib: torch.Tensor | None = None) -> torch.Tensor:
    """The composition term of the expression models: squared error, summed over genes, between
    ``log1p(10⁴ · scale)`` (the predicted composition) and the observed :func:`log_composition` of counts ``x``."""
    return (torch.log1p(scale * 1e4) - log_composition(x, lib)).pow(2).sum(-1)


class _Cache(dict):
    """Derived tensors rebuilt on demand: copies and pickles of a module start it empty (torch cannot copy CSR
    tensors, and the copy would be stale anyway)."""

    def __deepcopy__(self, memo: dict) -> _Cache:
        return _Cache()

    def __reduce__(self):
        return (_Cache, ())


class ReferenceBank:
    """Mixin for modules that keep a bank of training spots as buffers (saved with the weights): embedding
    ``bank_x``, log composition (log1p counts per 10k, stored sparse as CSR buffers ``bank_comp_indptr`` /
    ``bank_comp_indices`` / ``bank_comp_values``, read with :meth:`bank_composition`), log depth ``bank_loglib``
    and section code ``bank_section``."""

    #: the bank's buffers, resized from a saved state on load
    bank_buffers = ("bank_x", "bank_comp_indptr", "bank_comp_indices", "bank_comp_values", "bank_loglib", "bank_section")

    def _register_bank(self, n_input: int, n_genes: int, *, embedding: bool = True) -> None:
        self.n_bank_genes = int(n_genes)
        if embedding:
            self.register_buffer("bank_x", torch.zeros(0, n_input))
            self.register_buffer("bank_section", torch.zeros(0, dtype=torch.long))
        self.register_buffer("bank_comp_indptr", torch.zeros(1, dtype=torch.long))
        # int64: DDP broadcasts buffers with gloo, which crashed (SIGSEGV) on an int32 buffer here
        self.register_buffer("bank_comp_indices", torch.zeros(0, dtype=torch.long))
        self.register_buffer("bank_comp_values", torch.zeros(0))
        self.register_buffer("bank_loglib", torch.zeros(0))

    def _set_bank_composition(self, counts: Any) -> None:
        comp, lib = log_composition_csr(counts)
        dev = self.bank_loglib.device
        self.bank_comp_indptr = torch.as_tensor(comp.indptr.astype(np.int64)).to(dev)
        self.bank_comp_indices = torch.as_tensor(comp.indices.astype(np.int64)).to(dev)
        self.bank_comp_values = torch.as_tensor(comp.data.astype(np.float32)).to(dev)
        self.bank_loglib = torch.as_tensor(np.log(lib), dtype=torch.float32).to(dev)

    def set_bank(self, x: np.ndarray, counts: Any, section: np.ndarray) -> None:
        """Store the reference bank (embedding, log composition, log depth and section code of the training spots);
        ``counts`` (dense or sparse) stays sparse."""
        self._set_bank_composition(counts)
        dev = self.bank_loglib.device
        self.bank_x = torch.as_tensor(np.asarray(x, dtype=np.float32)).to(dev)
        self.bank_section = torch.as_tensor(np.asarray(section), dtype=torch.long).to(dev)

    def bank_composition(self, rows: Any) -> torch.Tensor:
        """Dense log composition of bank rows ``rows`` (any shape; the result is ``(rows.numel(), G)``)."""
        return csr_rows_torch(self.bank_comp_indptr, self.bank_comp_indices, self.bank_comp_values, rows, self.n_bank_genes)

    def _bank_csr(self, kind: str) -> torch.Tensor:
        """The bank as a torch CSR tensor of ``kind`` ``'logcomp'`` (log1p counts per 10k), ``'frac'`` (the
        fraction of the spot's counts) or ``'frac2'`` (its square); cached until the bank changes."""
        v = self.bank_comp_values
        bank = (v.data_ptr(), v._version, v.numel(), str(v.device))
        cache = self.__dict__.get("_bank_csr_cache")
        if cache is None or cache.get("bank") != bank:  # a new bank: drop what was derived from the old one
            cache = self.__dict__["_bank_csr_cache"] = _Cache(bank=bank, cols=self.bank_comp_indices)
        if kind not in cache:
            if kind != "logcomp":
                v = torch.expm1(v) / 1e4
                v = v * v if kind == "frac2" else v
            n = int(self.bank_comp_indptr.numel()) - 1
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # torch: CSR support is "beta"
                cache[kind] = torch.sparse_csr_tensor(self.bank_comp_indptr, cache["cols"], v, size=(n, self.n_bank_genes))
        return cache[kind]

    #: partial products one sparse product may hold (rows × k × non-zeros per bank row): bounds its workspace
    product_budget = 4_000_000

    def bank_weighted(self, rows: torch.Tensor, weights: torch.Tensor, kind: str = "logcomp") -> torch.Tensor:
        """Dense ``(b, G)`` weighted sums ``Σ_j weights[i, j] · bank[rows[i, j]]`` of the bank's ``kind`` values
        (see :meth:`_bank_csr`), as sparse products over blocks of query rows: the ``b × k`` retrieved rows are
        never gathered densely, and each product's workspace stays under :attr:`product_budget` entries."""
        b, k = rows.shape
        n = int(self.bank_comp_indptr.numel()) - 1
        bank = self._bank_csr(kind)
        per_row = max(1.0, self.bank_comp_values.numel() / max(n, 1))
        step = max(1, int(self.product_budget // (k * per_row)))
        out = []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
            for a in range(0, b, step):
                r, w = rows[a : a + step], weights[a : a + step]
                which = torch.arange(r.shape[0], device=rows.device).repeat_interleave(k)
                m = torch.sparse_coo_tensor(torch.stack([which, r.reshape(-1)]), w.reshape(-1).float(), (r.shape[0], n))
                out.append(torch.sparse.mm(m.coalesce().to_sparse_csr(), bank).to_dense())
        return torch.cat(out) if out else torch.zeros((0, self.n_bank_genes), device=rows.device)

    def bank_composition_rows(self) -> CountRows:
        """The bank's log composition as :class:`~stfm._rows.CountRows` (CPU, sparse)."""
        n = int(self.bank_comp_indptr.numel()) - 1
        # copies, not views of the buffers' memory: spawning DDP workers moves buffers to shared memory and frees
        # the old block, and a view kept in a data module would then be pickled from freed memory (NaN rows)
        csr = sparse.csr_matrix((self.bank_comp_values.detach().cpu().numpy().copy(), self.bank_comp_indices.cpu().numpy().copy(),
                                 self.bank_comp_indptr.cpu().numpy().copy()), shape=(n, self.n_bank_genes))  # fmt: skip
        return CountRows(csr)


class Standardize(nn.Module):
    """``(x - mean) / std`` with the statistics of the training data held as buffers (saved with the model)."""

    def __init__(self, n_input: int, mean: np.ndarray | None = None, std: np.ndarray | None = None) -> None:
        super().__init__()
        m = np.zeros(n_input, np.float32) if mean is None else np.asarray(mean, np.float32)
        s = np.ones(n_input, np.float32) if std is None else np.asarray(std, np.float32)
        if m.shape != (n_input,) or s.shape != (n_input,):
            msg = f"Expected standardisation statistics of shape ({n_input},), found {m.shape} and {s.shape}."
            raise ValueError(msg)
        self.register_buffer("mean", torch.as_tensor(m))
        self.register_buffer("std", torch.as_tensor(np.maximum(s, 1e-6)))

    def set(self, mean: np.ndarray | torch.Tensor, std: np.ndarray | torch.Tensor) -> None:
        """Replace the statistics in place."""
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.std.copy_(torch.clamp(torch.as_tensor(std, dtype=torch.float32), min=1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


class MLP(nn.Module):
    """``input dropout → [Linear → LayerNorm → GELU → Dropout] × n_layers`` (→ a final Linear when ``n_output``).

    ``n_layers=0`` is the identity on the (dropped-out) input. ``layer_norm=False`` leaves the normalisation out.
    """

    def __init__(
        self,
        n_input: int,
        n_hidden: int = 256,
        n_layers: int = 1,
        *,
        n_output: int | None = None,
        dropout: float = 0.2,
        input_dropout: float = 0.0,
        layer_norm: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout(input_dropout)] if input_dropout > 0 else []
        d = n_input
        for _ in range(int(n_layers)):
            layers.append(nn.Linear(d, n_hidden))
            if layer_norm:
                layers.append(nn.LayerNorm(n_hidden))
            layers += [nn.GELU(), nn.Dropout(dropout)]
            d = n_hidden
        if n_output is not None:
            layers.append(nn.Linear(d, n_output))
            d = n_output
        self.net = nn.Sequential(*layers)
        self.n_output = d

    def __getitem__(self, i: int) -> nn.Module:
        return self.net[i]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ZINBHead(nn.Module):
    """Hidden state ``h`` → ZINB(μ = l · scale, θ, π) over ``n_genes`` with an image-predicted library size.

    ``scale = softmax(W_s h)`` (sums to 1 over the panel), ``π = sigmoid(W_z h)``, ``log l̂ = w_l · h + b_l``
    (initialised at the training mean log library size), ``θ`` gene-wise. With ``library=None`` the predicted
    library size ``l̂`` is used (an H&E-only section), else the given one (training: the observed counts' sum).
    """

    def __init__(self, n_hidden: int, n_genes: int, *, log_library_mean: float = 0.0) -> None:
        super().__init__()
        self.scale_head = nn.Linear(n_hidden, n_genes)
        self.zi_head = nn.Linear(n_hidden, n_genes)
        self.library_head = nn.Linear(n_hidden, 1)
        nn.init.zeros_(self.library_head.weight)
        nn.init.constant_(self.library_head.bias, float(log_library_mean))
        nn.init.constant_(self.zi_head.bias, -2.0)
        self.log_theta = nn.Parameter(torch.zeros(n_genes))

    def forward(self, h: torch.Tensor, library: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        scale = torch.softmax(self.scale_head(h), dim=-1)
        zi_logits = self.zi_head(h)
        log_library_pred = self.library_head(h)
        lib = torch.exp(log_library_pred) if library is None else library
        theta = torch.exp(self.log_theta).expand_as(scale)
        px = ZeroInflatedNegativeBinomial(mu=lib * scale, theta=theta, zi_logits=zi_logits, scale=scale)
        return {"px": px, "scale": scale, "zi_logits": zi_logits, "log_library_pred": log_library_pred, "library": lib}


def zinb_variance(mu: torch.Tensor, theta: torch.Tensor, zi_prob: torch.Tensor) -> torch.Tensor:
    """Variance of ZINB(μ, θ, π): ``(1 − π) μ (1 + μ / θ + π μ)`` (the zero-inflated mean is ``(1 − π) μ``)."""
    return (1 - zi_prob) * mu * (1 + mu / theta + zi_prob * mu)


def info_nce(z_a: torch.Tensor, z_b: torch.Tensor, log_temperature: torch.Tensor | float, *, normalize: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE, per sample: row ``i`` of ``z_a`` and row ``i`` of ``z_b`` are the positive pair.

    ``normalize=True`` L2-normalises both sides (cosine logits); the logits are divided by ``exp(log_temperature)``
    (clamped at 1e-3). Returns a ``(n,)`` tensor, the mean of the two cross-entropies.
    """
    if normalize:
        z_a, z_b = F.normalize(z_a, dim=-1), F.normalize(z_b, dim=-1)
    t = torch.as_tensor(log_temperature, dtype=z_a.dtype, device=z_a.device).exp().clamp(min=1e-3)
    logits = z_a @ z_b.T / t
    target = torch.arange(z_a.shape[0], device=z_a.device)
    return 0.5 * (F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.T, target, reduction="none"))


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention: ``q ← q + MHA(LN(q), LN(kv))``, then ``q ← q + FFN(LN(q))``.

    ``kv_mask`` (``(n, n_kv)`` bool, ``True`` = a real token) masks absent tokens; a row with no real token leaves
    its queries unchanged by the attention step (no NaN).
    """

    def __init__(self, d_model: int, n_heads: int = 4, *, dropout: float = 0.1, ffn_mult: int = 2) -> None:
        super().__init__()
        if d_model % n_heads:
            msg = f"`d_model` ({d_model}) must be divisible by `n_heads` ({n_heads})."
            raise ValueError(msg)
        self.norm_q = nn.LayerNorm(d_model)
        self.norm_kv = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm_ffn = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, ffn_mult * d_model), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_mult * d_model, d_model)
        )

    def forward(self, q: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor | None = None) -> torch.Tensor:
        pad = None
        empty = None
        if kv_mask is not None:
            pad = ~kv_mask.bool()
            empty = pad.all(dim=1)
            if bool(empty.any()):
                pad = pad.clone()
                pad[empty, 0] = False  # attend to one (masked-out below) token instead of producing NaN
        out, _ = self.attn(self.norm_q(q), self.norm_kv(kv), self.norm_kv(kv), key_padding_mask=pad, need_weights=False)
        if empty is not None and bool(empty.any()):
            out = out.masked_fill(empty[:, None, None], 0.0)
        q = q + out
        return q + self.ffn(self.norm_ffn(q))


def segment_softmax(scores: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Softmax of ``scores`` (E, H) within groups of equal ``index`` (E,), over ``n`` groups."""
    idx = index.view(-1, 1).expand_as(scores)
    top = torch.full((n, scores.shape[1]), -torch.inf, device=scores.device, dtype=scores.dtype)
    top = top.scatter_reduce(0, idx, scores, reduce="amax", include_self=True)
    e = torch.exp(scores - top.gather(0, idx))
    den = torch.zeros((n, scores.shape[1]), device=scores.device, dtype=scores.dtype).scatter_add(0, idx, e)
    return e / den.gather(0, idx).clamp(min=1e-16)


def edge_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, n_dst: int,
            heads: int, dropout: float, training: bool, edge_weight: torch.Tensor | None = None) -> torch.Tensor:  # noqa: FBT001
    """Multi-head attention of each destination node over its source nodes along the edges (src → dst); an
    ``edge_weight`` (E, 1) scales each edge's message."""
    d = q.shape[1]
    dh = d // heads
    qi = q[dst].view(-1, heads, dh)
    kj = k[src].view(-1, heads, dh)
    a = (qi * kj).sum(-1) / math.sqrt(dh)
    a = F.dropout(segment_softmax(a, dst, n_dst), p=dropout, training=training)
    msg = (a.unsqueeze(-1) * v[src].view(-1, heads, dh)).view(-1, d)
    if edge_weight is not None:
        msg = msg * edge_weight
    return torch.zeros((n_dst, d), device=q.device, dtype=q.dtype).index_add(0, dst, msg)


def init_log_temperature(value: float, *, learn: bool = True) -> nn.Parameter:
    """A scalar ``log τ`` parameter, learnable or fixed."""
    return nn.Parameter(torch.tensor(math.log(value)), requires_grad=bool(learn))
