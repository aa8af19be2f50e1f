"""Checks of a batch configuration against its encoder and saved models, run once before any slide starts.

Only model metadata (``stfm_model.json``) is read here; no weights are loaded and torch is not imported, so a
configuration whose expression model was trained on another encoder's embedding fails in a second, not after an
hour of feature extraction on a cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._config import BatchConfig, BatchConfigError

__all__ = ["cancer_model_info", "check_config", "encoder_keys", "expression_model_info"]


def encoder_keys(encoder: str) -> tuple[str, str, int | None]:
    """(encoder key, obsm key written by ``extract_features``, embedding width or ``None``) of a features encoder.

    Raises a :class:`BatchConfigError` for a name that is neither an encoder card nor a timm model.
    """
    from ..encoders._cards import get_card

    try:
        card = get_card(encoder)
    except KeyError as err:
        import re

        if encoder.startswith(("hf-hub:", "hf_hub:")) or _is_timm_model(encoder):
            key = re.sub(r"[^a-z0-9_]+", "_", encoder.lower()).strip("_") or "encoder"
            return key, f"X_{key}", None
        msg = f"steps.features.encoder: {err.args[0]}"
        raise BatchConfigError(msg) from None
    return card.key, f"X_{card.key}", getattr(card, "embed_dim", None)


def _is_timm_model(name: str) -> bool:
    try:
        import timm
    except ImportError:  # pragma: no cover - timm is a core dependency
        return False
    return bool(timm.is_model(name.split(".", 1)[0]))


def _read_meta(folder: str, step: str) -> dict[str, Any]:
    from ..model._persist import CheckpointError, read_meta

    try:
        return read_meta(folder)
    except (FileNotFoundError, CheckpointError) as err:
        msg = f"steps.{step}.model: {err}"
        raise BatchConfigError(msg) from None


def expression_model_info(folder: str) -> dict[str, Any]:
    """Method, class, genes, embedding key, encoder and embedding width of a saved expression model folder."""
    meta = _read_meta(folder, "expression")
    genes = [str(g) for g in (meta.get("var_names") or [])]
    if meta.get("class") == "ExpressionEnsemble":
        meta = _read_meta(str(Path(folder) / "member_0"), "expression")
    if meta.get("class") == "CancerClassifier":
        msg = f"steps.expression.model: {folder!r} holds a CancerClassifier; it belongs under steps.cancer.model."
        raise BatchConfigError(msg)
    attrs = meta.get("attributes") or {}
    emb = attrs.get("embedding_key_") or (meta.get("registry") or {}).get("setup_args", {}).get("embedding_key")
    return {"class": meta.get("class"), "method": meta.get("method"), "genes": genes, "embedding_key": emb,
            "encoder": attrs.get("encoder_"), "n_embedding": attrs.get("n_embedding_")}  # fmt: skip


def cancer_model_info(folder: str) -> dict[str, Any]:
    """Image / expression embedding keys and widths a saved :class:`~stfm.model.CancerClassifier` reads."""
    meta = _read_meta(folder, "cancer")
    if meta.get("class") != "CancerClassifier":
        msg = (
            f"steps.cancer.model: {folder!r} holds a {meta.get('class')} (method {meta.get('method')!r}), not a "
            "CancerClassifier; save one from `stfm.tl.fit_cancer_model(...)` with `model.save(path)`."
        )
        raise BatchConfigError(msg)
    setup = (meta.get("registry") or {}).get("setup_args", {})
    attrs = meta.get("attributes") or {}
    return {"image_key": setup.get("image_key"), "expression_key": setup.get("expression_key"),
            "n_image": attrs.get("n_image_"), "n_expression": attrs.get("n_expression_")}  # fmt: skip


def check_config(cfg: BatchConfig) -> dict[str, Any]:
    """Check that the steps fit together; return what the workers need to know (embedding key, genes).

    - the encoder is a known card or timm model;
    - an expression model trained on another encoder, or on another ``obsm`` key, than the features step writes;
    - ``expression.genes`` that the model does not predict;
    - a cancer model reading an image embedding the features step does not write, or only an expression
      embedding (which the batch does not compute).
    """
    problems: list[str] = []
    info: dict[str, Any] = {"embedding_key": None}
    feats = cfg.steps.get("features")
    enc_key = emb_key = dim = None
    if feats is not None:
        enc_key, emb_key, dim = encoder_keys(feats["encoder"])
        info["embedding_key"] = emb_key
    expr = cfg.steps.get("expression")
    if expr is not None:
        m = expression_model_info(expr["model"])
        info["expression"] = m
        if feats is not None:
            if m["encoder"] not in (None, "None") and m["encoder"] != enc_key:
                problems.append(
                    f"the expression model {expr['model']!r} was trained on {m['encoder']!r} embeddings "
                    f"(`obsm[{m['embedding_key']!r}]`) but steps.features.encoder is {feats['encoder']!r}; set the "
                    f"encoder to {m['encoder']!r} or train the model on `obsm[{emb_key!r}]`"
                )
            elif m["embedding_key"] is not None and m["embedding_key"] != emb_key:
                problems.append(
                    f"the expression model {expr['model']!r} reads `obsm[{m['embedding_key']!r}]` but the features step "
                    f"writes `obsm[{emb_key!r}]`; train it with `embedding_key={emb_key!r}`"
                )
            elif dim is not None and m["n_embedding"] is not None and int(m["n_embedding"]) != int(dim):
                problems.append(
                    f"the expression model {expr['model']!r} expects {m['n_embedding']}-dimensional embeddings but "
                    f"{feats['encoder']!r} gives {dim}"
                )
        genes = expr.get("genes")
        if genes is not None:
            panel = set(m["genes"])
            missing = [g for g in genes if g not in panel]
            if missing:
                problems.append(
                    f"steps.expression.genes: {len(missing)} of {len(genes)} genes are not predicted by {expr['model']!r} "
                    f"(e.g. {missing[:5]}); it predicts {len(panel)} genes (e.g. {sorted(panel)[:5]})"
                )
    cancer = cfg.steps.get("cancer")
    if cancer is not None:
        c = cancer_model_info(cancer["model"])
        info["cancer"] = c
        if c["image_key"] is None:
            problems.append(
                f"the cancer model {cancer['model']!r} reads only an expression embedding "
                f"(`obsm[{c['expression_key']!r}]`), which `stfm batch` does not compute; train it with "
                "`use_rep=` (an image embedding) to run it in a batch"
            )
        elif feats is not None and c["image_key"] != emb_key:
            problems.append(
                f"the cancer model {cancer['model']!r} reads `obsm[{c['image_key']!r}]` but the features step writes "
                f"`obsm[{emb_key!r}]`; use the encoder it was trained on or retrain it with `use_rep={emb_key!r}`"
            )
        elif feats is not None and dim is not None and c["n_image"] is not None and int(c["n_image"]) != int(dim):
            problems.append(
                f"the cancer model {cancer['model']!r} expects {c['n_image']}-dimensional image embeddings but "
                f"{feats['encoder']!r} gives {dim}"
            )
    if problems:
        msg = "The steps do not fit together:\n  - " + "\n  - ".join(problems)
        raise BatchConfigError(msg)
    return info
