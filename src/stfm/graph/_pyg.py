"""torch_geometric builders: a spatial ``Data`` graph per section set, chunked similarity search, and the
target ↔ reference ``HeteroData`` graph of the cross-section methods (imports torch and torch_geometric lazily)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ._geometry import knn_graph, radius_graph

if TYPE_CHECKING:
    import torch

__all__ = ["reference_graph", "similarity_topk", "spatial_data"]


def _edge_index(adj: Any) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    coo = adj.tocoo()
    order = np.lexsort((coo.col, coo.row))
    ei = torch.as_tensor(np.stack([coo.row[order], coo.col[order]]), dtype=torch.long)
    return ei, torch.as_tensor(coo.data[order], dtype=torch.float32)


def spatial_data(
    coords: np.ndarray,
    x: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    k: int | None = None,
    radius: float | None = None,
    pitches: float = 1.5,
    y: np.ndarray | None = None,
) -> Any:
    """A :class:`torch_geometric.data.Data` over spots: ``x`` features, ``pos`` centres, spatial edges within groups.

    Edges: the ``k`` nearest spots (directed, made symmetric) when ``k`` is given, else the radius graph
    (``radius``, or ``pitches`` × each section's pitch; see :func:`stfm.graph.radius_graph`). ``edge_weight`` holds
    the centre distance. ``y`` (optional) is stored as the node targets.
    """
    import torch
    from torch_geometric.data import Data

    coords = np.asarray(coords, dtype=np.float64)[:, :2]
    x = np.asarray(x, dtype=np.float32)
    if x.shape[0] != coords.shape[0]:
        msg = f"Expected one feature row per spot ({coords.shape[0]}), found {x.shape[0]}."
        raise ValueError(msg)
    if k is not None:
        adj = knn_graph(coords, k, groups=groups)
        adj = adj.maximum(adj.T).tocsr()
    else:
        adj = radius_graph(coords, radius, groups=groups, pitches=pitches)
    edge_index, edge_weight = _edge_index(adj)
    data = Data(x=torch.as_tensor(x), pos=torch.as_tensor(coords, dtype=torch.float32), edge_index=edge_index,
                edge_weight=edge_weight)  # fmt: skip
    if y is not None:
        data.y = torch.as_tensor(np.asarray(y, dtype=np.float32))
    return data


def similarity_topk(
    query: np.ndarray | torch.Tensor,
    reference: np.ndarray | torch.Tensor,
    k: int,
    *,
    chunk_size: int = 4096,
    normalize: bool = True,
    device: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` most similar reference rows for every query row, in chunks (memory ``O(chunk_size²)``).

    Similarity is the cosine (``normalize=True``) or the plain dot product of the rows. Returns ``(indices, sims)``,
    both ``(n_query, k)``, most similar first (int64 / float32). No dense ``n_query × n_reference`` matrix is built.
    """
    import torch

    q = torch.as_tensor(np.asarray(query) if not isinstance(query, torch.Tensor) else query, dtype=torch.float32)
    r = torch.as_tensor(np.asarray(reference) if not isinstance(reference, torch.Tensor) else reference, dtype=torch.float32)
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1]:
        msg = f"Expected query (n, d) and reference (m, d) of the same width, found {tuple(q.shape)} and {tuple(r.shape)}."
        raise ValueError(msg)
    k = int(k)
    if k < 1 or k > r.shape[0]:
        msg = f"Expected 1 <= k <= {r.shape[0]} (the number of reference rows), found k={k}."
        raise ValueError(msg)
    dev = torch.device(device) if device is not None else q.device
    q, r = q.to(dev), r.to(dev)
    if normalize:
        q = torch.nn.functional.normalize(q, dim=1)
        r = torch.nn.functional.normalize(r, dim=1)
    chunk = max(1, int(chunk_size))
    idx_out = np.empty((q.shape[0], k), dtype=np.int64)
    sim_out = np.empty((q.shape[0], k), dtype=np.float32)
    with torch.inference_mode():
        for a in range(0, q.shape[0], chunk):
            qa = q[a : a + chunk]
            best_s = torch.full((qa.shape[0], k), -torch.inf, device=dev)
            best_i = torch.zeros((qa.shape[0], k), dtype=torch.long, device=dev)
            for b in range(0, r.shape[0], chunk):
                s = qa @ r[b : b + chunk].T
                kk = min(k, s.shape[1])
                top_s, top_i = s.topk(kk, dim=1)
                cat_s = torch.cat([best_s, top_s], dim=1)
                cat_i = torch.cat([best_i, top_i + b], dim=1)
                best_s, pos = cat_s.topk(k, dim=1)
                best_i = cat_i.gather(1, pos)
            idx_out[a : a + qa.shape[0]] = best_i.cpu().numpy()
            sim_out[a : a + qa.shape[0]] = best_s.cpu().numpy()
    return idx_out, sim_out


def reference_graph(
    target_coords: np.ndarray,
    target_x: np.ndarray,
    references: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    k_reference: int = 6,
    k_reference_knn: int = 3,
    target_groups: np.ndarray | None = None,
    pitches: float = 1.5,
    chunk_size: int = 4096,
) -> Any:
    """The target ↔ reference :class:`torch_geometric.data.HeteroData` graph of the cross-section methods.

    Node types: ``'target'`` (the query spots: ``x`` = embedding, ``pos``) and ``'reference'`` (the union over target
    spots of the ``k_reference`` most similar spots of **each** reference section, by cosine of the embeddings:
    ``x`` = embedding, ``y`` = measured expression, ``section`` = index into ``references``, ``source_index`` = row
    in that section). Edge types: ``('target', 'near', 'target')`` (spatial radius graph within target sections),
    ``('reference', 'similar', 'reference')`` (each reference node's ``k_reference_knn`` most similar reference
    nodes), ``('target', 'links', 'reference')`` and its reverse ``('reference', 'linked_by', 'target')``, with the
    cosine similarity as ``edge_attr``.

    ``references`` maps a section name to ``(embedding, expression)`` (expression dense or sparse, or ``None`` for
    a graph without ``y``; only the rows used are densified); it must not contain the target's own
    sections (a target's measured expression is never reachable through the graph). Memory stays bounded: the
    similarity search runs in chunks (:func:`similarity_topk`).
    """
    import torch
    from torch_geometric.data import HeteroData

    tx = np.asarray(target_x, dtype=np.float32)
    if not references:
        msg = "Expected at least one reference section, found none."
        raise ValueError(msg)
    ref_x, ref_y, ref_sec, ref_src = [], [], [], []
    link_t, link_r, link_s = [], [], []
    offset = 0
    for s_i, (name, (emb, expr)) in enumerate(references.items()):
        emb = np.asarray(emb, dtype=np.float32)
        if expr is not None and emb.shape[0] != expr.shape[0]:
            msg = f"Reference {name!r}: {emb.shape[0]} embedding rows but {expr.shape[0]} expression rows."
            raise ValueError(msg)
        if emb.shape[1] != tx.shape[1]:
            msg = (
                f"Reference {name!r} has {emb.shape[1]}-dimensional embeddings but the target has {tx.shape[1]}; "
                "embed every section with the same encoder."
            )
            raise ValueError(msg)
        if k_reference > emb.shape[0]:
            msg = f"k_reference={k_reference} is larger than reference section {name!r} ({emb.shape[0]} spots)."
            raise ValueError(msg)
        idx, sim = similarity_topk(tx, emb, k_reference, chunk_size=chunk_size)
        used, inverse = np.unique(idx.ravel(), return_inverse=True)
        ref_x.append(emb[used])
        if expr is not None:  # only the rows the graph uses are densified
            y = expr[used]
            ref_y.append(np.asarray(y.toarray() if hasattr(y, "toarray") else y, dtype=np.float32))
        ref_sec.append(np.full(used.size, s_i))
        ref_src.append(used)
        link_t.append(np.repeat(np.arange(tx.shape[0]), k_reference))
        link_r.append(inverse + offset)
        link_s.append(sim.ravel())
        offset += used.size
    rx = np.concatenate(ref_x)
    data = HeteroData()
    data["target"].x = torch.as_tensor(tx)
    data["target"].pos = torch.as_tensor(np.asarray(target_coords, dtype=np.float32)[:, :2])
    data["reference"].x = torch.as_tensor(rx)
    if len(ref_y) == len(references):
        data["reference"].y = torch.as_tensor(np.concatenate(ref_y))
    elif ref_y:
        msg = "Give the expression of every reference section, or of none (`(embedding, None)`)."
        raise ValueError(msg)
    data["reference"].section = torch.as_tensor(np.concatenate(ref_sec), dtype=torch.long)
    data["reference"].source_index = torch.as_tensor(np.concatenate(ref_src), dtype=torch.long)
    tt, tt_w = _edge_index(radius_graph(target_coords, groups=target_groups, pitches=pitches))
    data["target", "near", "target"].edge_index = tt
    data["target", "near", "target"].edge_attr = tt_w
    kk = min(int(k_reference_knn), rx.shape[0] - 1)
    if kk >= 1:
        ridx, rsim = similarity_topk(rx, rx, kk + 1, chunk_size=chunk_size)
        src = np.repeat(np.arange(rx.shape[0]), kk + 1)
        keep = ridx.ravel() != src
        data["reference", "similar", "reference"].edge_index = torch.as_tensor(
            np.stack([src[keep], ridx.ravel()[keep]]), dtype=torch.long
        )
        data["reference", "similar", "reference"].edge_attr = torch.as_tensor(rsim.ravel()[keep])
    ei = torch.as_tensor(np.stack([np.concatenate(link_t), np.concatenate(link_r)]), dtype=torch.long)
    ea = torch.as_tensor(np.concatenate(link_s), dtype=torch.float32)
    data["target", "links", "reference"].edge_index = ei
    data["target", "links", "reference"].edge_attr = ea
    data["reference", "linked_by", "target"].edge_index = ei.flip(0)
    data["reference", "linked_by", "target"].edge_attr = ea
    return data
