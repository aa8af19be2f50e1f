"""The README's main job: her2st → features → expression from H&E → cancer regions, on one held-out section."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

#: Training sections for expression (patient C, full-resolution H&E) and annotated sections for cancer.
EXPRESSION_TRAIN = ("C2", "C3", "C4", "C5", "C6")
CANCER_REFERENCE = ("A1", "B1", "C1", "D1")
MARKERS = ("ERBB2", "KRT19", "MGP")
ENCODER = "efficientnet_lite0"


def _step(name: str) -> float:
    print(f"[stfm demo] {name} …", flush=True)
    return time.perf_counter()


def _done(t0: float, what: str) -> None:
    print(f"[stfm demo]   {what} ({time.perf_counter() - t0:.1f} s)", flush=True)


def _quiet_training_logs() -> None:
    """Keep the demo's output to its own progress lines: no Lightning banners or scvi-tools info logs."""
    import logging

    import scvi  # configures its own logger on import: lower it afterwards

    scvi.settings.verbosity = logging.WARNING
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=SyntaxWarning, module="docrep")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def run_demo(out: str | os.PathLike[str] = "stfm_demo_out", *, section: str = "B4", fast: bool = False) -> Path:
    """Run the demo and return the output folder.

    1. reads her2st ``section`` (default B4, patient B) as SpatialData, and the training/reference sections;
    2. embeds every spot's H&E with ``efficientnet_lite0`` (real ImageNet weights, offline);
    3. trains every registered expression method (:func:`stfm.model.list_methods`: ridge, ZINB, retrieval, …) on
       C2–C6 (patient C) for the 50 most variable training genes plus ERBB2, KRT19, MGP, predicts ``section`` from
       H&E alone and scores it against its measured counts (raw and composition Pearson);
    4. trains the cancer classifier on the pathologist-annotated A1, B1, C1, D1 (one section per patient) and maps
       tumour / boundary / non-tumour on ``section``;
    5. writes ``<out>/<section>.zarr`` (tables ``table`` with features and cancer calls, ``predicted`` with the
       predicted panel), ``<section>_overview.png``, ``<section>_expression.png``, ``<section>_cancer.png`` and
       ``<section>_expression_metrics.csv``.

    ``fast=True`` trains for a few epochs only (a smoke test of the whole chain, not a result).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    from spatialdata.models import TableModel

    from . import datasets, get, io, model, pl, pp, tl
    from ._settings import settings
    from .tl._expression import _accepted, concat_sections, select_genes

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _quiet_training_logs()
    show_bar = settings.show_progress_bar and not fast

    t0 = _step(f"reading her2st {section}, {', '.join(EXPRESSION_TRAIN)} and {', '.join(CANCER_REFERENCE)}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="her2st .*: loading without", category=UserWarning)
        sdata = datasets.her2st(section, as_spatialdata=True)
        train = [datasets.her2st(s) for s in EXPRESSION_TRAIN if s != section]
        reference = {s: datasets.her2st(s) for s in CANCER_REFERENCE if s != section}
    table = sdata.tables["table"]
    sf = table.uns["spatial"][section]["scalefactors"]
    _done(t0, f"{section}: {table.n_obs} spots × {table.n_vars} genes, {sf['microns_per_pixel']:.3f} µm/px")

    t0 = _step(f"extracting {ENCODER} features (112 µm tiles at 0.5 µm/px)")
    pp.extract_features(sdata, ENCODER, image_key=f"{section}_full_image", show_progress_bar=show_bar)
    for adata in train:
        pp.extract_features(adata, ENCODER, show_progress_bar=show_bar)
    key = f"X_{ENCODER}"
    _done(t0, f"obsm['{key}'] {table.obsm[key].shape} on {section} and {len(train)} training sections")

    t0 = _step("training expression models on " + ", ".join(a.obs["section"].iloc[0] for a in train))
    candidates = concat_sections(train)
    panel = list(dict.fromkeys([*MARKERS, *select_genes(candidates, 50)]))
    # --fast: five epochs of every stage (the two-stage methods have a pretraining stage of their own)
    epochs = {"max_epochs": 5, "early_stopping_patience": 5, "pretrain_epochs": 5, "pretrain_patience": 5,
              "autoencoder_epochs": 5, "autoencoder_patience": 5} if fast else {}  # fmt: skip
    models = {}
    for method in model.list_methods().index:
        spec = model.get_method(method)
        accepted = _accepted(spec.cls, "train")  # (following **kwargs up to ExpressionModelBase.train)
        kw = {k: v for k, v in epochs.items() if k in accepted} if "early_stopping" in spec.supports else {}
        models[method] = tl.fit_expression(train, method=method, embedding_key=key, genes=panel, **kw)
    _done(t0, f"{len(panel)} genes: " + ", ".join(f"{k} ({m.fit_time_s_:.0f} s)" for k, m in models.items()))

    t0 = _step(f"predicting {section} from H&E and scoring against its measured counts")
    query = io.to_anndata(sdata)[:, get.model_genes(models["zinb"])].copy()  # with the hires H&E in uns
    rows = []
    for name, fitted in models.items():
        pred = query.copy()
        tl.predict_expression(pred, fitted, library_size="predicted")  # per-spot depth predicted from the H&E
        raw = tl.evaluate_expression(pred, model=fitted)
        comp = tl.evaluate_expression(pred, model=fitted, normalize=True)[["pearson_all", "pearson_top_variable"]]
        rows.append(raw.join(comp.add_suffix("_composition")).assign(method=name).reset_index())
        if name == "zinb":
            query = pred
    metrics = pd.concat(rows, ignore_index=True)
    metrics.to_csv(out / f"{section}_expression_metrics.csv", index=False)
    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.precision", 3):
        print(metrics.to_string(index=False))
    fig = pl.spatial_pred(query, list(MARKERS), compare=True, return_fig=True)
    fig.savefig(out / f"{section}_expression.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    _done(t0, f"{out / f'{section}_expression.png'}")

    t0 = _step("training the cancer classifier on " + ", ".join(reference))
    # one call from counts: the model stores its own expression embedding and embeds the new section itself
    cancer = tl.fit_cancer_model(reference, **({"max_epochs": 3} if fast else {}))
    tl.detect_cancer_regions(sdata, cancer, table_key="table", shapes_added=f"{section}_tumor")
    counts = table.obs["cancer_region"].value_counts()
    fig = pl.cancer_regions(io.to_anndata(sdata, table_key="table"), return_fig=True)  # on the H&E
    fig.savefig(out / f"{section}_cancer.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    _done(t0, ", ".join(f"{n} {c}" for c, n in counts.items()) + f" → {out / f'{section}_cancer.png'}")

    t0 = _step("writing SpatialData zarr and the overview")
    query.obs["region"] = table.obs["region"].to_numpy()
    query.obs["spot_id"] = table.obs["spot_id"].to_numpy()
    query.uns.pop("spatialdata_attrs", None)
    sdata.tables["predicted"] = TableModel.parse(query, region=section, region_key="region", instance_key="spot_id")
    io.write_zarr(sdata, out / f"{section}.zarr", overwrite=True)
    adata = io.to_anndata(sdata, table_key="table")
    color = "cluster_annotation" if "cluster_annotation" in adata.obs else None
    fig = pl.overview(adata, color=color, return_fig=True)
    fig.savefig(out / f"{section}_overview.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    _done(t0, str(out / f"{section}.zarr"))
    return out
