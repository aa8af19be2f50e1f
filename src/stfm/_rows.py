"""Counts kept sparse and handed out dense a block of rows at a time.

Wide panels (thousands of genes) over many spots do not fit as one dense matrix: the expression models read the
training counts through :class:`CountRows`, graph batches refer to rows with :class:`RowRef` and are filled in only
when a batch is used (:func:`materialize`), statistics and validation scores stream over row blocks
(:class:`ColumnPearson`), and reference banks are stored as CSR buffers (:func:`csr_rows_torch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse

__all__ = [
    "BLOCK_ROWS", "ColumnPearson", "CountRows", "RowRef", "as_count_rows", "csr_rows_torch", "log_composition_csr",
    "log_normalise", "materialize",
]  # fmt: skip

#: rows densified at once when a whole matrix is streamed (4,096 × 5,000 genes × 8 bytes = 164 MB in float64)
BLOCK_ROWS = 4096


class CountRows:
    """A sparse spots × genes matrix whose rows are read dense, a block at a time.

    ``rows[idx]`` (an int array, a boolean mask or a slice) returns those rows as a dense float32 array; the whole
    matrix is never densified. ``sparse`` is the CSR matrix itself.
    """

    def __init__(self, x: Any) -> None:
        if isinstance(x, CountRows):
            x = x.sparse
        csr = sparse.csr_matrix(x, dtype=np.float32)
        if not csr.has_canonical_format:
            # sum_duplicates sorts in place, and csr_matrix(x, dtype=…) copies the values but may share x's index
            # arrays: sorting those reordered the caller's matrix (its columns permuted within rows). Work on a copy.
            csr = csr.copy()
            csr.sum_duplicates()
        self.sparse = csr

    @property
    def shape(self) -> tuple[int, int]:
        return self.sparse.shape

    def __len__(self) -> int:
        return self.sparse.shape[0]

    def __getitem__(self, rows: Any) -> np.ndarray:
        return np.asarray(self.sparse[rows].toarray(), dtype=np.float32)

    def weighted(self, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Dense ``(n, G)`` weighted sums ``Σ_j weights[i, j] · X[rows[i, j]]`` (a sparse product, no gather)."""
        rows, weights = np.asarray(rows), np.asarray(weights, dtype=np.float32)
        n, k = rows.shape
        w = sparse.csr_matrix((weights.ravel(), rows.ravel(), np.arange(0, n * k + 1, k)), shape=(n, self.shape[0]))
        return np.asarray((w @ self.sparse).toarray(), dtype=np.float32)


def as_count_rows(x: Any) -> CountRows:
    """``x`` (dense, scipy sparse or :class:`CountRows`) as :class:`CountRows`."""
    return x if isinstance(x, CountRows) else CountRows(x)


def log_normalise(
    x: Any, *, target_sum: float = 1e4, sparse_output: bool = False, dtype: Any = np.float64, check: bool = False
) -> Any:
    """``log1p(x / row sum × target_sum)`` of every row: the one log-normalisation of stfm's NumPy code.

    Rows that sum to 0 stay 0. ``x`` dense or sparse (never modified); ``sparse_output=True`` returns a CSR matrix
    with the zeros of ``x`` (``log1p(0) = 0``), otherwise a dense array. Computed in float64, returned as ``dtype``.
    ``check=True`` refuses negative or non-finite values (counts, or predicted expression on the count scale).
    """
    if sparse_output:
        csr = sparse.csr_matrix(x, dtype=np.float64, copy=True)
        csr.sum_duplicates()  # log1p of duplicate entries one by one would not be the log of their sum
        values = csr.data
    else:
        dense = np.asarray(x.toarray() if sparse.issparse(x) else x, dtype=np.float64)
        values = dense
    if check and values.size and (not np.isfinite(values).all() or values.min() < 0):
        msg = "Expected non-negative finite counts (or predicted expression on the count scale), found negative or non-finite values."
        raise ValueError(msg)
    if sparse_output:
        lib = np.asarray(csr.sum(1)).ravel()
        lib[lib == 0] = 1.0
        data = np.log1p(csr.data / np.repeat(lib, np.diff(csr.indptr)) * target_sum).astype(dtype)
        return sparse.csr_matrix((data, csr.indices, csr.indptr), shape=csr.shape)
    lib = dense.sum(1, keepdims=True)
    lib[lib == 0] = 1.0
    return np.log1p(dense / lib * target_sum).astype(dtype, copy=False)


def log_composition_csr(x: Any) -> tuple[sparse.csr_matrix, np.ndarray]:
    """``(log1p counts per 10k, library size)`` of every row (:func:`log_normalise`, float32, sparse); the library
    size is floored at 1."""
    csr = as_count_rows(x).sparse
    lib = np.maximum(np.asarray(csr.sum(1, dtype=np.float64)).ravel(), 1.0)
    return log_normalise(csr, sparse_output=True, dtype=np.float32), lib


@dataclass(frozen=True)
class RowRef:
    """A graph entry left unfilled until the batch is used: rows ``rows`` of the source named ``source`` (dense
    ``(len(rows), G)``), or with ``weights`` of the same ``(n, k)`` shape, the weighted sums of ``k`` rows each."""

    source: str
    rows: np.ndarray
    weights: np.ndarray | None = None


def materialize(graph: dict[str, Any], sources: dict[str, CountRows]) -> dict[str, Any]:
    """``graph`` with every :class:`RowRef` replaced by its dense float32 tensor, read from ``sources``."""
    import torch

    out = {}
    for key, value in graph.items():
        if isinstance(value, RowRef):
            src = sources.get(value.source)
            if src is None:
                msg = f"Graph entry {key!r} reads rows of {value.source!r}, which this model does not hold."
                raise KeyError(msg)
            dense = src[value.rows] if value.weights is None else src.weighted(value.rows, value.weights)
            value = torch.as_tensor(dense, dtype=torch.float32)
        out[key] = value
    return out


def csr_rows_torch(indptr: Any, indices: Any, values: Any, rows: Any, n_cols: int) -> Any:
    """Dense ``(len(rows), n_cols)`` rows of a CSR matrix held as three torch tensors (on their device)."""
    import torch

    rows = torch.as_tensor(rows, device=indptr.device).reshape(-1).long()
    start = indptr[rows]
    length = indptr[rows + 1] - start
    out = torch.zeros((rows.numel(), int(n_cols)), dtype=values.dtype, device=values.device)
    total = int(length.sum())
    if total == 0:
        return out
    which = torch.repeat_interleave(torch.arange(rows.numel(), device=indptr.device), length)
    first = torch.cumsum(length, 0) - length
    offset = torch.arange(total, device=indptr.device) - first[which] + start[which]
    out[which, indices[offset].long()] = values[offset]
    return out


class ColumnPearson:
    """Per-column Pearson correlation of two matrices fed a block of rows at a time (Chan et al.'s pairwise update
    of means and co-moments, so it is exact and stable however the rows are split)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean_p: np.ndarray | float = 0.0
        self.mean_t: np.ndarray | float = 0.0
        self.spp: np.ndarray | float = 0.0
        self.stt: np.ndarray | float = 0.0
        self.spt: np.ndarray | float = 0.0

    def add(self, p: np.ndarray, t: np.ndarray) -> None:
        """Add rows ``p`` (predicted) and ``t`` (true) of the same shape."""
        p, t = np.asarray(p, dtype=np.float64), np.asarray(t, dtype=np.float64)
        m = p.shape[0]
        if m == 0:
            return
        cp, ct = p.mean(0), t.mean(0)
        dp, dt = p - cp, t - ct
        spp, stt, spt = (dp * dp).sum(0), (dt * dt).sum(0), (dp * dt).sum(0)
        if self.n == 0:
            self.n, self.mean_p, self.mean_t, self.spp, self.stt, self.spt = m, cp, ct, spp, stt, spt
            return
        n = self.n + m
        delta_p, delta_t = cp - self.mean_p, ct - self.mean_t
        f = self.n * m / n
        self.spp = self.spp + spp + delta_p * delta_p * f
        self.stt = self.stt + stt + delta_t * delta_t * f
        self.spt = self.spt + spt + delta_p * delta_t * f
        self.mean_p = self.mean_p + delta_p * m / n
        self.mean_t = self.mean_t + delta_t * m / n
        self.n = n

    def correlations(self) -> np.ndarray:
        """Pearson r per column (NaN where either column is constant)."""
        den = np.sqrt(np.asarray(self.spp) * np.asarray(self.stt))
        return np.where(den > 1e-12, np.asarray(self.spt) / np.where(den > 1e-12, den, 1.0), np.nan)

    def mean(self) -> float:
        """Mean r over the columns that are not constant (NaN if there are none)."""
        r = self.correlations()
        ok = np.isfinite(r)
        return float(r[ok].mean()) if ok.any() else float("nan")
