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
from ._cancer_common import DEFAULT_IGNORE, DEFAULT_POSITIVE, _as_list, _check_labels, _split_sections

if TYPE_CHECKING:
    from ..model._cancer import CancerClassifier

__all__ = ["fit_cancer_model"]


def _token_table(
    sections: list[tuple[str, AnnData]],
    *,
    use_rep: str | None,
    expr_rep: str | None,
    label_key: str | None,
    section_key: str,
    spatial_key: str,
) -> AnnData:
    """A fresh AnnData (no X) with the columns the classifier reads; inputs untouched."""
    obs, obsm = [], {k: [] for k in ("spatial", use_rep, expr_rep) if k is not None}
    dims: dict[str, int] = {}
    for name, t in sections:
        check_spatial(t, spatial_key, purpose="the spatial context", where=f"reference section {name!r}")
        o = pd.DataFrame({section_key: name}, index=[f"{name}:{i}" for i in t.obs_names])
        if label_key is not None:
            o[label_key] = t.obs[label_key].astype("object").to_numpy()
        obs.append(o)
        obsm["spatial"].append(np.asarray(t.obsm[spatial_key], dtype=np.float64)[:, :2])
        for k in (use_rep, expr_rep):
            if k is None:
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
    expr_rep: str | None = None,
    section_key: str = "section",
    spatial_key: str = "spatial",
    scales: Sequence[float] = (1.0, 2.0, 4.0),
    n_sectors: int = 4,
    validation: Literal["sections", "none"] = "sections",
    threshold_criterion: Literal["f1", "youden"] = "f1",
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

    Threshold without test labels: with ``validation='sections'`` every reference section is held out in turn,
    a model with the same settings is trained on the other sections and scores it; the pooled out-of-section
    logits are Platt-calibrated (``σ(a · logit + b)``) and the threshold that maximises ``threshold_criterion``
    on the calibrated validation scores is stored in the final model (trained on all reference sections), with
    the calibration. Detection then applies that calibration and threshold to any query section; no query label
    is read. A single reference section falls back to a random 25 % of its spots for validation (with a
    warning), and ``validation='none'`` keeps threshold 0.5 on uncalibrated probabilities.

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
        ``obsm`` key of the expression embedding (e.g. ``'X_scvi_expr'`` from :func:`expression_embedding`).
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
    The trained classifier, with ``threshold_``, ``calibration_`` and ``validation_`` set: per held-out section its
    AUC, counts and ``trained_on``, the sections the fold model that scored it was trained on.
    """
    from sklearn.metrics import roc_auc_score

    from ..model._cancer import label_to_target

    if use_rep is None and expr_rep is None:
        msg = "Neither `use_rep` (image embedding) nor `expr_rep` (expression embedding) was given. Run `stfm.pp.extract_features` and/or `stfm.tl.expression_embedding` and pass their obsm keys."
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
    for name, t in sections:
        _check_labels(t, label_key, positive, ignore, where=f"reference section {name!r}", names=False)
        present = [k for k in (use_rep, expr_rep) if k is not None and k in t.obsm]
        if not present:
            msg = (
                f"Reference section {name!r} has neither embedding: `obsm[{use_rep!r}]` / `obsm[{expr_rep!r}]` not found. "
                f"Available obsm keys: {sorted(t.obsm)}. Run `stfm.pp.extract_features` or `stfm.tl.expression_embedding` first."
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
    for k in (use_rep, expr_rep):
        if k is not None and not any(k in t.obsm for _, t in sections):
            msg = f"`obsm[{k!r}]` is not in any reference section. Available obsm keys: {sorted(sections[0][1].obsm)}."
            raise KeyError(msg)
    use_rep = use_rep if use_rep is not None and any(use_rep in t.obsm for _, t in sections) else None
    train_kw = {"use_rep": use_rep, "expr_rep": expr_rep, "label_key": label_key, "positive": positive, "ignore": ignore,
                "section_key": section_key, "scales": scales, "n_sectors": n_sectors, "model_kwargs": model_kwargs,
                "max_epochs": int(max_epochs), "batch_size": int(batch_size), "lr": float(lr), "seed": int(seed),
                "accelerator": accelerator, "devices": devices, "strategy": strategy}  # fmt: skip
    tok_kw = {"use_rep": use_rep, "expr_rep": expr_rep, "label_key": label_key, "section_key": section_key, "spatial_key": spatial_key}

    val_logits, val_labels, per_section = [], [], {}
    if validation == "sections" and len(sections) >= 2:
        for v, (vname, vt) in enumerate(sections):
            train_secs = [s for i, s in enumerate(sections) if i != v]
            ytr = label_to_target(pd.concat([pd.Series(t.obs[label_key].astype("object").to_numpy()) for _, t in train_secs]), positive, ignore)
            if np.nansum(ytr == 1) == 0 or np.nansum(ytr == 0) == 0:
                logger.warning("skipping validation fold %s: the other sections lack one class", vname)
                continue
            fold_tok = _token_table(train_secs, **tok_kw)
            fold = _train_one(fold_tok, **train_kw)
            vtok = _token_table([(vname, vt)], **tok_kw)
            logits = fold.predict_logits(vtok)
            y = label_to_target(vt.obs[label_key], positive, ignore)
            val_logits.append(logits)
            val_labels.append(y)
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
        tok = _token_table([(name, t)], **tok_kw)
        tok.obs[label_key] = tok.obs[label_key].astype("object").where(~hold, None).astype("category")
        fold = _train_one(tok, **train_kw)
        logits = fold.predict_logits(_token_table([(name, t)], **tok_kw))
        y = label_to_target(t.obs[label_key], positive, ignore)
        val_logits.append(logits[hold])
        val_labels.append(y[hold])
    elif validation != "none":
        msg = f"Expected `validation` to be 'sections' or 'none', found {validation!r}."
        raise ValueError(msg)

    model = _train_one(_token_table(sections, **tok_kw), **train_kw)
    if val_logits:
        model.set_threshold(np.concatenate(val_logits), np.concatenate(val_labels), criterion=threshold_criterion)
    model.validation_ = {"method": validation if val_logits else "none", "sections": per_section}
    model.fit_params_ = {"label_key": label_key, "positive": list(positive), "ignore": list(ignore),
                         "reference_sections": [s for s, _ in sections], "max_epochs": int(max_epochs), "seed": int(seed)}  # fmt: skip
    return model
