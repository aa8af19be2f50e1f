"""The batched inference loop of ``extract_features``: a DataLoader of crops feeding one encoder."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import numpy as np

from .._settings import settings

if TYPE_CHECKING:
    import torch

    from ..data import TileDataset
    from ..encoders import ImageEncoder

__all__ = ["embed_tiles"]


def embed_tiles(
    enc: ImageEncoder, dataset: TileDataset, *, batch_size: int, num_workers: int | None, amp: bool | None, progress: bool
) -> tuple[np.ndarray, str, bool, bool]:
    import multiprocessing as mp

    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from ..data import resize_tiles
    from ..data._malloc import malloc_tuned, tune_malloc

    dev = enc.device
    cuda = dev.type == "cuda"
    if dev.type == "cpu" and settings.tune_malloc:
        tune_malloc()
    use_amp = bool(amp if amp is not None else (settings.amp if settings.amp is not None else cuda))
    if use_amp and dev.type == "cpu":
        use_amp = bool(amp)  # only when asked for explicitly: bf16 on CPU is slower on most machines
    dtype = getattr(torch, settings.autocast_dtype)
    enc = enc.to(memory_format=torch.channels_last)
    dataset.source.prepare()  # decode once here; forked workers share it

    n = len(dataset)
    if num_workers is None:
        num_workers = settings.resolve_num_workers(dev)
    workers = num_workers if n > batch_size else 0
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs["prefetch_factor"] = 4
        if "fork" in mp.get_all_start_methods():
            kwargs["multiprocessing_context"] = "fork"
    # Crops are read in bands across the image (chunk caches stay warm) and resampled to the encoder input a
    # batch at a time on the device; features are written back in the caller's order.
    order = dataset.locality_order()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=order.tolist(),
        num_workers=workers,
        pin_memory=cuda,
        **kwargs,
    )
    out = np.empty((n, enc.embed_dim), dtype=np.float32)
    autocast = torch.autocast(device_type=dev.type, dtype=dtype) if use_amp else contextlib.nullcontext()
    # On CUDA, features go back through pinned buffers with asynchronous copies, and the host waits for batch k
    # only after batch k + 1 is queued: a blocking `.cpu()` per batch would leave the GPU idle while the next
    # batch is fetched and its kernels are launched.
    pending: tuple[np.ndarray, torch.Tensor, Any] | None = None

    def _drain(item: tuple[np.ndarray, torch.Tensor, Any]) -> None:
        rows, host, done = item
        done.synchronize()
        out[rows] = host.numpy()

    start = 0
    with torch.inference_mode(), autocast:
        # tqdm.auto's tqdm calls iter() on what it wraps and then iterates it again: hand it an iterator, or a
        # DataLoader would start (and prefetch with) a second, unused set of workers.
        batches = iter(loader)
        for batch in tqdm(batches, total=len(loader), disable=not progress, desc="extract_features", unit="batch"):
            x = batch.to(dev, non_blocking=cuda).permute(0, 3, 1, 2)  # (B, H, W, 3) -> channels-last (B, 3, H, W)
            f = enc(resize_tiles(x, dataset.tile_px))
            rows = order[start : start + x.shape[0]]
            if cuda:
                host = torch.empty(f.shape, dtype=torch.float32, pin_memory=True)
                host.copy_(f, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
                if pending is not None:
                    _drain(pending)
                pending = (rows, host, done)
            else:
                out[rows] = f.cpu().numpy()  # no copy on the CPU
            start += x.shape[0]
        if pending is not None:
            _drain(pending)
    return out, str(dev), use_amp, malloc_tuned()
