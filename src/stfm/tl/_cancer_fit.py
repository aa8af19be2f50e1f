"""``fit_cancer_model``: train a :class:`~stfm.model.CancerClassifier` on annotated sections and fix its threshold."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from .._containers import get_table
from .._logging import logger
from .._validation import check_positive, check_spatial
from ._cancer_common import DEFAULT_IGNORE, DEFAULT_POSITIVE, _as_list, _check_labels, _provenance_kind, _split_sections

if TYPE_CHECKING:
    from ..model._cancer import CancerClassifier
    from ..model._cancer_embedder import ExpressionEmbedder

#: ``expr_rep`` value meaning "fit the PCA expression embedding on the reference and store it in the model"
STORED = "auto"
#: the token-table key of the stored embedding
STORED_KEY = "X_stfm_cancer_expr"
#: inner-validation AUC below which a fitted model is reported as unreliable
MIN_VALIDATION_AUC = 0.6

__all__ = ["fit_cancer_model"]


def _token_table(
    sections: list[tuple[str, AnnData]],
    *,
    use_rep: str | None,
    expr_rep: str | None,
    label_key: str | None,
    section_key: str,
    spatial_key: str,
    embedder: ExpressionEmbedder | None = None,
) -> AnnData:
    """A fresh AnnData (no X) with the columns the classifier reads; inputs untouched.

    With ``embedder`` the expression embedding (``obsm[expr_rep]``) is computed from each section's counts.
    """
    obs, obsm = [], {k: [] for k in ("spatial", use_rep, expr_rep) if k is not None}
    dims: dict[str, int] = {}
    if embedder is not None:
        dims[expr_rep] = embedder.n_comps
    for name, t in sections:
        check_spatial(t, spatial_key, purpose="the spatial context", where=f"reference section {name!r}")
        o = pd.DataFrame({section_key: name}, index=[f"{name}:{i}" for i in t.obs_names])
        if label_key is not None:
            o[label_key] = t.obs[label_key].astype("object").to_numpy()
        obs.append(o)
        obsm["spatial"].append(np.asarray(t.obsm[spatial_key], dtype=np.float64)[:, :2])
        if embedder is not None:
            obsm[expr_rep].append(embedder.transform(t))
        for k in (use_rep, expr_rep):
            if k is None or (embedder is not None and k == expr_rep):
                continue
            if k in t.obsm:
                x = np.asarray(t.obsm[k], dtype=np.float32)
                if k in dims and dims[k] != x.shape[1]:
                    msg = f"`obsm[{k!r}]` has dimension {x.shape[1]} in section {name!r} but {dims[k]} in another section; all sections need the same embedding."
                    raise ValueError(msg)
                dims[k] = x.shape[1]
                obsm[k].append(x)
            else:
                obsm[k].append(None)
    tok = AnnData(obs=pd.concat(obs))
    tok.obsm["spatial"] = np.vstack(obsm["spatial"])
    for k in (use_rep, expr_rep):
        if k is None:
            continue
        blocks = [b if b is not None else np.full((len(o), dims[k]), np.nan, np.float32) for b, o in zip(obsm[k], obs)]
        tok.obsm[k] = np.vstack(blocks)
    if label_key is not None:
        tok.obs[label_key] = tok.obs[label_key].astype("category")
    return tok


def _train_one(tok: AnnData, *, use_rep, expr_rep, label_key, positive, ignore, section_key, scales, n_sectors,
               model_kwargs, max_epochs, batch_size, lr, seed, accelerator="auto", devices=1,
               strategy="auto") -> CancerClassifier:  # fmt: skip
    import scvi

    from ..model._cancer import CancerClassifier

    scvi.settings.seed = seed
    CancerClassifier.setup_anndata(
        tok, image_key=use_rep, expression_key=expr_rep, label_key=label_key, positive=tuple(positive),
        ignore=tuple(ignore), section_key=section_key, spatial_key="spatial", scales=tuple(scales), n_sectors=n_sectors,
    )  # fmt: skip
    model = CancerClassifier(tok, **(model_kwargs or {}))
    model.train(
        max_epochs=max_epochs, batch_size=batch_size, train_size=1.0, accelerator=accelerator, devices=devices,
        strategy=strategy,
        plan_kwargs={"lr": lr, "weight_decay": 1e-4}, enable_progress_bar=False, logger=False,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    return model


def fit_cancer_model(
    reference: AnnData | Sequence[AnnData] | Mapping[str, AnnData],
    *,
    label_key: str = "pathologist_label",
    positive: Sequence[str] = DEFAULT_POSITIVE,
    ignore: Sequence[str] = DEFAULT_IGNORE,
    use_rep: str | None = None,
    expr_rep: str | None = STORED,
    genes: Sequence[str] | None = None,
    n_comps: int = 16,
    n_top_genes: int = 2000,
    standardize: Literal["section", "none"] = "section",
    section_key: str = "section",
    spatial_key: str = "spatial",
    scales: Sequence[float] = (1.0, 2.0, 4.0, 8.0),
    n_sectors: int = 4,
    validation: Literal["sections", "none"] = "sections",
    threshold_criterion: Literal["f1", "youden"] = "f1",
    threshold_transfer: Literal["auto", "platt", "section", "prior", "quantile"] = "auto",
    max_epochs: int = 30,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    model_kwargs: Mapping[str, Any] | None = None,
    accelerator: str = "auto",
    devices: int | str | Sequence[int] = 1,
    strategy: str | Any = "auto",
) -> CancerClassifier:
    """Train a :class:`~stfm.model.CancerClassifier` on annotated reference sections and fix its threshold.

    One call from counts: by default (``expr_rep='auto'``) the model fits its own expression embedding on the
    reference counts (PCA of log-normalised counts of the reference's most variable genes, standardised within
    each section) and stores the loadings, so :func:`detect_cancer_regions` embeds any new section, measured or
    predicted from H&E (``layer='predicted'``), with no user step. ``expr_rep='X_…'`` uses an embedding the user
    computed instead (e.g. the joint, transductive scVI embedding of :func:`expression_embedding`); a query then
    needs the same key.

    Threshold without test labels: with ``validation='sections'`` every reference section is held out in turn,
    a model with the same settings (its embedding included) is trained on the other sections and scores it.
    The out-of-section logits are calibrated and the threshold that maximises ``threshold_criterion`` is stored
    in the final model (trained on all reference sections). How that threshold transfers to a new section is
    ``threshold_transfer`` (see :mod:`stfm.model._calibration`); ``'auto'`` compares the four transfers by a
    nested leave-one-section-out over the validation sections (fit on the others, apply to the held-out one)
    and keeps the best mean ``threshold_criterion``. A single reference section falls back to a random 25 % of
    its spots for validation (with a warning), and ``validation='none'`` keeps threshold 0.5 on uncalibrated
    probabilities. A warning lists the sections whose held-out AUC is below 0.6.

    Parameters
    ----------
    reference
        Annotated sections: one AnnData (sections in ``obs[section_key]``), a list, or a dict name → AnnData.
    label_key
        ``obs`` column of annotations.
    positive
        Label names counted as tumour.
    ignore
        Label names left out of training and validation (e.g. ``'undetermined'``).
    use_rep
        ``obsm`` key of the image embedding (e.g. ``'X_efficientnet_lite0'``); sections without it train the
        expression side only.
    expr_rep
        ``'auto'`` (the stored embedding, above), an ``obsm`` key of a precomputed expression embedding, or
        ``None`` for an image-only model.
    genes
        ``'auto'`` only: genes the stored embedding may use (e.g. those a query platform measures); default all
        genes shared by the reference sections. Its genes are the ``n_top_genes`` most variable of them.
    n_comps, n_top_genes, standardize
        ``'auto'`` only: embedding dimension, number of genes, and ``'section'`` (per-section standardisation of
        the embedding, label-free) or ``'none'``.
    section_key
        ``obs`` column naming sections (for one AnnData holding several).
    spatial_key
        ``obsm`` key of spot centres.
    scales, n_sectors
        Spatial context rings (in spot pitches) and angular sectors.
    validation
        ``'sections'`` (held-out whole sections, see above) or ``'none'``.
    threshold_criterion
        ``'f1'`` (maximise F1) or ``'youden'`` (maximise sensitivity + specificity − 1) on validation.
    threshold_transfer
        ``'auto'``, ``'platt'``, ``'section'``, ``'prior'`` or ``'quantile'`` (see above).
    max_epochs, batch_size, lr
        Training schedule (fixed; never chosen on query data).
    seed
        Random seed: two calls with the same seed and data give the same model.
    model_kwargs
        Passed to :class:`~stfm.model.CancerClassifier` (``d_model``, ``n_layers``, ``modality_dropout``, …).
    accelerator, devices, strategy
        Lightning device selection for every model trained here (the validation folds and the final model),
        passed to :class:`lightning.pytorch.Trainer`: ``accelerator='auto'`` picks a GPU when there is one and the
        CPU otherwise; ``devices=1`` trains on one device (the classifier is small; e.g. ``devices=4,
        strategy='ddp'`` spreads a large reference over four GPUs).

    Returns
    -------
    The trained classifier, with ``threshold_``, ``calibration_`` (transfer, Platt coefficients, calibration
    error on validation), ``embedder_`` (the stored embedding, ``'auto'`` only) and ``validation_`` set: per
    held-out section its AUC, counts and ``trained_on`` (the sections the fold model that scored it was trained
    on), and under ``'threshold_transfer'`` the nested comparison of the transfers.
    """
    from sklearn.metrics import roc_auc_score

    from ..model._calibration import STRATEGIES, compare_strategies, expected_calibration_error
    from ..model._cancer import label_to_target
    from ..model._cancer_embedder import ExpressionEmbedder

    stored = expr_rep == STORED
    if use_rep is None and expr_rep is None:
        msg = "Neither `use_rep` (image embedding) nor an expression embedding: pass `expr_rep='auto'` (the default: the model fits and stores one from the reference counts), an obsm key, or `use_rep`."
        raise ValueError(msg)
    if threshold_transfer not in ("auto", *STRATEGIES):
        msg = f"Expected `threshold_transfer` to be 'auto' or one of {list(STRATEGIES)}, found {threshold_transfer!r}."
        raise ValueError(msg)
    check_positive(max_epochs, name="max_epochs")
    objs, names = _as_list(reference)
    sections: list[tuple[str, AnnData]] = []
    for i, o in enumerate(objs):
        t = get_table(o)
        for sec, idx in _split_sections(t, section_key):
            name = sec if len(objs) == 1 or names is None else (names[i] if len(_split_sections(t, section_key)) == 1 else f"{names[i]}:{sec}")
            sections.append((name, t[idx]))
    seen = [s for s, _ in sections]
    if len(set(seen)) != len(seen):
        sections = [(f"{i}:{s}", t) for i, (s, t) in enumerate(sections)]
    expr_key = STORED_KEY if stored else expr_rep
    for name, t in sections:
        _check_labels(t, label_key, positive, ignore, where=f"reference section {name!r}", names=False)
        if stored:
            if t.X is None or t.n_vars == 0:
                msg = f"Reference section {name!r} has no counts in `X`; the default expression embedding is fitted on reference counts. Pass `expr_rep=` with a precomputed embedding or `expr_rep=None, use_rep=…`."
                raise ValueError(msg)
            continue
        present = [k for k in (use_rep, expr_rep) if k is not None and k in t.obsm]
        if not present:
            msg = (
                f"Reference section {name!r} has neither embedding: `obsm[{use_rep!r}]` / `obsm[{expr_rep!r}]` not found. "
                f"Available obsm keys: {sorted(t.obsm)}. Run `stfm.pp.extract_features` or `stfm.tl.expression_embedding` first, "
                "or leave `expr_rep='auto'` to let the model embed the counts."
            )
            raise KeyError(msg)
    all_labels = pd.concat([pd.Series(t.obs[label_key].astype("object").to_numpy()) for _, t in sections])
    found = set(all_labels.dropna().astype(str))
    y_all = label_to_target(all_labels, positive, ignore)
    if np.nansum(y_all == 1) == 0:
        msg = f"No positive spots in the reference: none of `obs[{label_key!r}]` is in positive={list(positive)}. Labels present: {sorted(found)}."
        raise ValueError(msg)
    # names of the her2st defaults may be absent from a reference (B1 has no 'cancer in situ'); user names may not
    defaults = {*DEFAULT_POSITIVE, *DEFAULT_IGNORE}
    unknown = [lab for lab in (*positive, *ignore) if lab not in found and lab not in defaults]
    if unknown:
        msg = f"Unknown label names {unknown} in `obs[{label_key!r}]`. Labels present in the reference: {sorted(found)}."
        raise ValueError(msg)
    if np.nansum(y_all == 0) == 0:
        msg = f"No negative spots in the reference: every labelled spot of `obs[{label_key!r}]` is in positive={list(positive)}."
        raise ValueError(msg)
    for k in (use_rep, None if stored else expr_rep):
        if k is not None and not any(k in t.obsm for _, t in sections):
            msg = f"`obsm[{k!r}]` is not in any reference section. Available obsm keys: {sorted(sections[0][1].obsm)}."
            raise KeyError(msg)
    use_rep = use_rep if use_rep is not None and any(use_rep in t.obsm for _, t in sections) else None
    kinds = {k: _provenance_kind(next(t for _, t in sections if k in t.obsm), k) for k in (use_rep, None if stored else expr_rep) if k is not None}
    train_kw = {"use_rep": use_rep, "expr_rep": expr_key, "label_key": label_key, "positive": positive, "ignore": ignore,
                "section_key": section_key, "scales": scales, "n_sectors": n_sectors, "model_kwargs": model_kwargs,
                "max_epochs": int(max_epochs), "batch_size": int(batch_size), "lr": float(lr), "seed": int(seed),
                "accelerator": accelerator, "devices": devices, "strategy": strategy}  # fmt: skip
    tok_kw = {"use_rep": use_rep, "expr_rep": expr_key, "label_key": label_key, "section_key": section_key, "spatial_key": spatial_key}
    emb_kw = {"genes": genes, "n_comps": int(n_comps), "n_top_genes": int(n_top_genes), "standardize": standardize, "seed": int(seed)}

    def embedder_for(secs: list[tuple[str, AnnData]]) -> ExpressionEmbedder | None:
        return ExpressionEmbedder.fit([t for _, t in secs], **emb_kw) if stored else None

    val_logits: dict[str, np.ndarray] = {}
    val_labels: dict[str, np.ndarray] = {}
    per_section: dict[str, dict[str, Any]] = {}
    if validation == "sections" and len(sections) >= 2:
        for v, (vname, vt) in enumerate(sections):
            train_secs = [s for i, s in enumerate(sections) if i != v]
            ytr = label_to_target(pd.concat([pd.Series(t.obs[label_key].astype("object").to_numpy()) for _, t in train_secs]), positive, ignore)
            if np.nansum(ytr == 1) == 0 or np.nansum(ytr == 0) == 0:
                logger.warning("skipping validation fold %s: the other sections lack one class", vname)
                continue
            emb = embedder_for(train_secs)
            fold_tok = _token_table(train_secs, **tok_kw, embedder=emb)
            fold = _train_one(fold_tok, **train_kw)
            vtok = _token_table([(vname, vt)], **tok_kw, embedder=emb)
            logits = fold.predict_logits(vtok)
            y = label_to_target(vt.obs[label_key], positive, ignore)
            val_logits[vname], val_labels[vname] = logits, y
            keep = np.isfinite(y)
            auc = float(roc_auc_score(y[keep], logits[keep])) if np.unique(y[keep]).size == 2 else float("nan")
            per_section[vname] = {"auc": auc, "n_spots": int(keep.sum()), "n_positive": int(np.nansum(y == 1)),
                                  "trained_on": sorted(pd.unique(fold_tok.obs[section_key].astype(str)))}  # fmt: skip
    elif validation == "sections":
        warnings.warn(
            "Only one reference section: the threshold is chosen on a random 25% of its spots (not a held-out section); "
            "thresholds transfer better with two or more reference sections.", UserWarning, stacklevel=2,
        )  # fmt: skip
        name, t = sections[0]
        rng = np.random.default_rng(seed)
        hold = rng.random(t.n_obs) < 0.25
        emb = embedder_for([(name, t[~hold])]) if stored else None
        tok = _token_table([(name, t)], **tok_kw, embedder=emb)
        tok.obs[label_key] = tok.obs[label_key].astype("object").where(~hold, None).astype("category")
        fold = _train_one(tok, **train_kw)
        logits = fold.predict_logits(_token_table([(name, t)], **tok_kw, embedder=emb))
        y = label_to_target(t.obs[label_key], positive, ignore)
        val_logits[name], val_labels[name] = logits[hold], y[hold]
    elif validation != "none":
        msg = f"Expected `validation` to be 'sections' or 'none', found {validation!r}."
        raise ValueError(msg)

    low = {s: r["auc"] for s, r in per_section.items() if np.isfinite(r["auc"]) and r["auc"] < MIN_VALIDATION_AUC}
    if low:
        shown = ", ".join(f"{s}: {a:.2f}" for s, a in low.items())
        warnings.warn(
            f"Held-out AUC below {MIN_VALIDATION_AUC} on reference section(s) {shown} (a model trained on the other "
            "sections scored them): the classifier does not transfer between these sections, so its maps of new "
            "sections are unreliable. More epochs (`max_epochs`), more reference sections, or the section-"
            "standardised default embedding usually help.", UserWarning, stacklevel=2,
        )  # fmt: skip

    final_emb = embedder_for(sections)
    model = _train_one(_token_table(sections, **tok_kw, embedder=final_emb), **train_kw)
    transfer: dict[str, Any] = {}
    if val_logits:
        chosen = "platt" if threshold_transfer == "auto" else threshold_transfer
        if len(val_logits) >= 2:
            transfer = compare_strategies(val_logits, val_labels, criterion=threshold_criterion)
            if threshold_transfer == "auto" and transfer:
                # ties keep the earlier (simpler) transfer in STRATEGIES order
                chosen = max(transfer, key=lambda k: (round(transfer[k][f"mean_{threshold_criterion}"], 6), -STRATEGIES.index(k)))
        names_v = list(val_logits)
        lo = np.concatenate([val_logits[n] for n in names_v])
        la = np.concatenate([val_labels[n] for n in names_v])
        gr = np.concatenate([[n] * len(val_logits[n]) for n in names_v])
        model.set_threshold(lo, la, gr, criterion=threshold_criterion, strategy=chosen)
        keep = np.isfinite(la)
        p = model.calibrate(lo, gr)
        model.calibration_["ece_validation"] = expected_calibration_error(p[keep], la[keep])
        if transfer and chosen in transfer:
            model.calibration_["ece_nested"] = float(transfer[chosen]["mean_ece"])
        model.calibration_["transfer_choice"] = threshold_transfer
    model.embedder_ = final_emb.to_dict() if final_emb is not None else None
    model.embedding_kinds_ = {k: v for k, v in kinds.items() if v is not None}
    model.validation_ = {"method": validation if val_logits else "none", "sections": per_section, "threshold_transfer": transfer}
    model.fit_params_ = {"label_key": label_key, "positive": list(positive), "ignore": list(ignore),
                         "reference_sections": [s for s, _ in sections], "max_epochs": int(max_epochs), "seed": int(seed),
                         "expression": "stored PCA" if stored else str(expr_rep), "threshold_transfer": threshold_transfer}  # fmt: skip
    return model
