"""``ImageEncoder``: a frozen backbone with normalisation and pooling inside ``forward``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._cards import POOLINGS, EncoderCard

__all__ = ["ImageEncoder"]

_POOLINGS = (*POOLINGS, "module")


def _n_prefix_tokens(backbone: nn.Module) -> int:
    """Class + register (+ distillation) tokens in front of the patch tokens of a timm ViT."""
    n = getattr(backbone, "num_prefix_tokens", None)
    if n is None:
        msg = (
            f"Pooling 'cls_patch_mean' needs a ViT that exposes `num_prefix_tokens` (timm VisionTransformer); "
            f"found {type(backbone).__name__}. Use pooling 'cls' or 'token_default' for this model."
        )
        raise ValueError(msg)
    return int(n)


class ImageEncoder(nn.Module):
    """A frozen image encoder that maps RGB tiles to one feature vector per tile.

    Normalisation happens inside :meth:`forward`, so the tile pipeline can ship ``uint8`` tensors.

    Parameters
    ----------
    backbone
        The network. For poolings ``'cls'`` and ``'cls_patch_mean'`` it must have ``forward_features``
        returning tokens ``(B, N, D)`` (timm ViTs); for ``'avg'`` it must have ``forward_features`` returning a
        feature map ``(B, C, H, W)`` or tokens; for ``'token_default'`` and ``'module'`` it is called as is.
    key
        Encoder name (``obsm['X_<key>']``).
    embed_dim
        Length of the output vectors.
    tile_px
        Input side in pixels.
    mpp
        µm per input pixel the encoder expects (``None``: unknown).
    mean, std
        Per-channel normalisation of ``[0, 1]`` RGB.
    pooling
        One of ``'cls'``, ``'cls_patch_mean'``, ``'avg'``, ``'token_default'``, ``'module'`` (a user module
        whose output is already ``(B, embed_dim)``).
    card
        The card the encoder was built from (``None`` for timm names and user modules).
    revision
        Revision of the weights actually loaded (hub commit, package version or file hash).
    source
        Where the weights came from (``'hub:<repo>'``, ``'file:<path>'``, ``'package:<name>'``, ``'random'``,
        ``'module'``).
    license
        Licence of the weights, when known.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        key: str,
        embed_dim: int,
        tile_px: int,
        mpp: float | None,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        pooling: str = "token_default",
        card: EncoderCard | None = None,
        revision: str | None = None,
        source: str = "module",
        license: str | None = None,
    ) -> None:
        super().__init__()
        if pooling not in _POOLINGS:
            msg = f"Expected `pooling` to be one of {_POOLINGS}, found {pooling!r}."
            raise ValueError(msg)
        self.backbone = backbone
        self.key = str(key)
        self.card = card
        self.embed_dim = int(embed_dim)
        self.tile_px = int(tile_px)
        self.mpp = None if mpp is None else float(mpp)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.pooling = pooling
        self.revision = revision
        self.source = source
        self.license = license if license is not None else (card.license if card is not None else None)
        # (x / 255 - mean) / std  ==  x * scale + shift, folded into one multiply-add per pixel
        std_t = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        mean_t = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("_scale", 1.0 / std_t, persistent=False)
        self.register_buffer("_shift", -mean_t / std_t, persistent=False)
        self.requires_grad_(requires_grad=False)
        self.eval()

    # ------------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> ImageEncoder:  # noqa: FBT001, FBT002 - nn.Module signature
        """Encoders are frozen: the backbone always stays in eval mode (dropout off, BN statistics fixed)."""
        return super().train(mode=False)

    @property
    def device(self) -> torch.device:
        """Device of the encoder's parameters (CPU for a parameter-free module)."""
        for p in self.parameters():
            return p.device
        return self._scale.device

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``uint8`` in ``[0, 255]`` or float in ``[0, 1]`` to the normalised float input of the backbone."""
        if x.ndim != 4 or x.shape[1] != 3:
            msg = (
                f"Expected tiles of shape (B, 3, {self.tile_px}, {self.tile_px}) (RGB, channels first), "
                f"found {tuple(x.shape)}."
            )
            raise ValueError(msg)
        if x.dtype == torch.uint8:
            x = x.float().mul_(1.0 / 255.0)
        elif not torch.is_floating_point(x):
            msg = f"Expected uint8 tiles in [0, 255] or float tiles in [0, 1], found dtype {x.dtype}."
            raise TypeError(msg)
        dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
        scale = self._scale.to(device=x.device, dtype=dtype)
        shift = self._shift.to(device=x.device, dtype=dtype)
        return torch.addcmul(shift, x.to(dtype), scale)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Run the backbone on normalised input and pool to ``(B, D)``."""
        bb = self.backbone
        if self.pooling in ("token_default", "module"):
            return bb(x)
        feats = bb.forward_features(x)
        if self.pooling == "avg":
            if feats.ndim == 4:
                return feats.mean(dim=(2, 3))
            if feats.ndim == 3:
                return feats[:, _n_prefix_tokens(bb) :].mean(dim=1)
            return feats
        if feats.ndim != 3:
            msg = (
                f"Pooling {self.pooling!r} expects tokens (B, N, D) from `forward_features`, found shape "
                f"{tuple(feats.shape)}. Use pooling 'avg' or 'token_default' for this model."
            )
            raise ValueError(msg)
        cls = feats[:, 0]
        if self.pooling == "cls":
            return cls
        patches = feats[:, _n_prefix_tokens(bb) :]
        return torch.cat([cls, patches.mean(dim=1)], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch of tiles.

        Parameters
        ----------
        x
            ``(B, 3, tile_px, tile_px)`` RGB tiles, ``uint8`` in ``[0, 255]`` or float in ``[0, 1]``.

        Returns
        -------
        ``(B, embed_dim)`` float32 features.
        """
        out = self.pool(self.normalize(x))
        if not isinstance(out, torch.Tensor):
            msg = (
                f"Encoder {self.key!r} returned {type(out).__name__}; expected a tensor of shape "
                f"(B, embed_dim) = ({x.shape[0]}, {self.embed_dim})."
            )
            raise ValueError(msg)
        if out.ndim != 2 or out.shape[0] != x.shape[0] or out.shape[1] != self.embed_dim:
            msg = (
                f"Encoder {self.key!r} returned shape {tuple(out.shape)}; expected (B, embed_dim) = "
                f"({x.shape[0]}, {self.embed_dim}). A custom module must return one pooled vector per tile: "
                "flatten or pool its output, or pass the right `transform={'embed_dim': ...}` to "
                "`stfm.encoders.load_encoder`."
            )
            raise ValueError(msg)
        return out.float()

    # ------------------------------------------------------------------------------------------------
    def provenance(self) -> dict[str, Any]:
        """What produced the features, for ``uns['stfm']`` (no tokens, no local paths beyond the file name)."""
        return {
            "key": self.key,
            "source": self.source,
            "revision": self.revision,
            "embed_dim": self.embed_dim,
            "tile_px": self.tile_px,
            "mpp": self.mpp,
            "pooling": self.pooling,
            "license": self.license,
        }

    def extra_repr(self) -> str:
        return (
            f"key={self.key!r}, embed_dim={self.embed_dim}, tile_px={self.tile_px}, mpp={self.mpp}, "
            f"pooling={self.pooling!r}, source={self.source!r}, revision={self.revision!r}"
        )
