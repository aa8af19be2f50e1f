"""Write the notebooks of this folder from the cells below, and (``--execute``) run them with their outputs stored.

    python notebooks/build_notebooks.py              # (re)write the .ipynb files without outputs
    python notebooks/build_notebooks.py --execute    # and run each in full (what the docs show; ~25 min on 2 CPUs)

The test suite (``tests/test_notebooks.py``) runs every notebook in a fast mode (``STFM_NOTEBOOK_FAST=1``: fewer
epochs and sections, set in each notebook's first cell). Edit the cells here, not the .ipynb files.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

PARAMS = """import logging
import os
import warnings

# The test suite runs this notebook with STFM_NOTEBOOK_FAST=1: fewer epochs and sections, same code path.
FAST = os.environ.get("STFM_NOTEBOOK_FAST") == "1"
warnings.simplefilter("ignore")  # keep the rendered page readable

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc

import stfm

stfm.settings.show_progress_bar = False
# no INFO banners from the libraries underneath (Lightning's "GPU available" / "Seed set", scvi-tools, spatialdata);
# imported first because each sets its logger's level when imported
import lightning.pytorch
import scvi
import spatialdata

scvi.settings.verbosity = logging.WARNING
for name in ("lightning.pytorch", "lightning.fabric", "spatialdata._logging"):
    logging.getLogger(name).setLevel(logging.ERROR)
plt.rcParams["figure.dpi"] = 72"""

# fmt: off
NOTEBOOKS: dict[str, list[tuple[str, str]]] = {
    "01_quickstart": [
        ("md", "# Quick start: H&E embeddings into scanpy\n\nRead one her2st section, embed the H&E tile around each "
               "spot with a pathology-style encoder, and cluster the spots on their *image* embedding with scanpy, then "
               "compare those clusters with the expression clusters the her2st authors published."),
        ("code", PARAMS),
        ("md", "Section B4 of patient B: counts, spot coordinates in full-resolution pixels, the H&E and its µm/px "
               "(from the local mirror at `STFM_DATA_DIR`, or downloaded with checksums)."),
        ("code", 'adata = stfm.datasets.her2st("B4")\nadata'),
        ("md", "112-µm tiles at 0.5 µm/px around every spot, embedded with the offline default encoder "
               "(`efficientnet_lite0`, real ImageNet weights). The embedding goes to `obsm`, its provenance to `uns['stfm']`."),
        ("code", 'stfm.pp.extract_features(adata, "efficientnet_lite0")\n'
                 'print(adata.obsm["X_efficientnet_lite0"].shape)\n'
                 '{k: adata.uns["stfm"]["X_efficientnet_lite0"][k] for k in ("encoder", "tile_um", "mpp", "slide_mpp", "n_tiles")}'),
        ("md", "Neighbours, Leiden and UMAP on the image embedding: plain scanpy."),
        ("code", 'sc.pp.neighbors(adata, use_rep="X_efficientnet_lite0", n_neighbors=15)\n'
                 'sc.tl.leiden(adata, key_added="leiden_he", resolution=0.6, flavor="igraph", n_iterations=2)\n'
                 'sc.tl.umap(adata, random_state=0)\n'
                 'sc.pl.umap(adata, color=["leiden_he", "cluster_annotation"], wspace=0.5)'),
        ("md", "Where the image clusters fall on the tissue (squidpy draws over the H&E):"),
        ("code", 'import squidpy as sq\n\n'
                 'sq.pl.spatial_scatter(adata, color=["leiden_he", "cluster_annotation"], library_id="B4", size=1.2, wspace=0.4)'),
        ("md", "How much of the published expression clustering the H&E alone recovers:"),
        ("code", 'from sklearn.metrics import adjusted_rand_score\n\n'
                 'ann = adata.obs["cluster_annotation"]\n'
                 'known = (ann.notna() & (ann != "unknown")).to_numpy()  # spots the authors left unannotated are out\n'
                 'print(f"ARI (image clusters vs expression clusters, {known.sum()} annotated spots): "\n'
                 '      f"{adjusted_rand_score(adata.obs.loc[known, \'leiden_he\'], adata.obs.loc[known, \'cluster_annotation\']):.2f}")\n'
                 'pd.crosstab(adata.obs["leiden_he"], adata.obs["cluster_annotation"])'),
    ],
    "02_expression": [
        ("md", "# Expression from H&E: every method, one protocol\n\nTrain on patient C (sections C2–C6), predict "
               "patient B's B4 from its H&E alone, and score against its measured counts with both metrics: *raw* "
               "(Pearson of log1p counts, with each method's predicted depth) and *composition* (log1p counts per 10k, "
               "where depth earns nothing)."),
        ("code", PARAMS),
        ("code", 'names = ["C2", "C3"] if FAST else ["C2", "C3", "C4", "C5", "C6"]\n'
                 'train = [stfm.datasets.her2st(s) for s in names]\n'
                 'b4 = stfm.datasets.her2st("B4")\n'
                 'for a in [*train, b4]:\n'
                 '    stfm.pp.extract_features(a, "efficientnet_lite0")\n'
                 'stfm.model.list_methods()[["after", "needs", "summary"]]'),
        ("md", "Every registered method, with its defaults; epochs are chosen on the last training section "
               "(a validation section of patient C, never B4)."),
        ("code", '# FAST: a few epochs per training stage (the two-stage methods have a pretraining stage of their own)\n'
                 'quick = {"zinb": {"max_epochs": 3}, "retrieval": {"max_epochs": 3}, "hetero_graph": {"max_epochs": 3},\n'
                 '         "graph_ae": {"max_epochs": 3, "autoencoder_epochs": 3},\n'
                 '         "multimodal": {"max_epochs": 3, "pretrain_epochs": 3}} if FAST else {}\n'
                 'models, rows = {}, []\n'
                 'for method in stfm.model.list_methods().index:\n'
                 '    spec = stfm.model.get_method(method)\n'
                 '    model = stfm.tl.fit_expression(train, method=method, embedding_key="X_efficientnet_lite0", n_top_genes=50,\n'
                 '                                   seed=0, **quick.get(method, {}))\n'
                 '    q = b4[:, model.genes].copy()\n'
                 '    stfm.tl.predict_expression(q, model, library_size="predicted")\n'
                 '    raw = stfm.tl.evaluate_expression(q, model=model)["pearson_all"].iloc[0]\n'
                 '    comp = stfm.tl.evaluate_expression(q, model=model, normalize=True)["pearson_all"].iloc[0]\n'
                 '    models[method] = model\n'
                 '    rows.append({"method": method, "after": spec.after, "raw": raw, "composition": comp,\n'
                 '                 "fit (s)": model.fit_time_s_})\n'
                 'scores = pd.DataFrame(rows).set_index("method").round(3)\n'
                 'scores'),
        ("md", "The composition metric sees what the raw one hides: predicting depth well scores high on raw "
               "Pearson by itself (`docs/benchmarks/expression.md`)."),
        ("code", 'ax = scores[["raw", "composition"]].plot.bar(figsize=(6, 3), rot=30)\nax.set_ylabel("mean Pearson over genes (B4)")\nplt.show()'),
        ("md", "Predicted next to measured for two markers, with the ZINB model:"),
        ("code", 'zinb = models["zinb"]\n'
                 'q = b4[:, zinb.genes].copy()\n'
                 'stfm.tl.predict_expression(q, zinb, library_size="predicted", return_std=True)\n'
                 'genes = [g for g in ("ERBB2", "MGP", "KRT19", "SCGB2A2") if g in zinb.genes][:2]\n'
                 'stfm.pl.spatial_pred(q, genes, compare=True)'),
        ("md", "Uncertainty: the ZINB predictive standard deviation (`layers['predicted_std']`). A calibrated model "
               "has about 95 % of the measured counts within two standard deviations of the predicted mean."),
        ("code", 'x = q.X.toarray() if hasattr(q.X, "toarray") else np.asarray(q.X)\n'
                 'z = np.abs(x - q.layers["predicted"]) / np.maximum(q.layers["predicted_std"], 1e-6)\n'
                 'print(f"measured counts within 2 predicted std: {(z < 2).mean():.1%}")\n'
                 'cv = pd.Series((q.layers["predicted_std"] / np.maximum(q.layers["predicted"], 1e-6)).mean(0), index=q.var_names)\n'
                 'cv.sort_values().tail(10).plot.barh(figsize=(5, 3), title="least certain genes (mean std / mean)")\nplt.show()'),
    ],
    "03_squidpy": [
        ("md", "# squidpy on predicted expression\n\nPredicted expression is a normal AnnData layer, so squidpy's "
               "spatial statistics run on it unchanged. Legacy ST spots sit on a square grid: the spatial graph is "
               "a grid graph (`sq.gr.spatial_neighbors_grid`) with the 4 nearest neighbours."),
        ("code", PARAMS),
        ("code", 'import squidpy as sq\n\n'
                 'names = ["C2", "C3"] if FAST else ["C2", "C3", "C4", "C5", "C6"]\n'
                 'train = [stfm.datasets.her2st(s) for s in names]\n'
                 'b4 = stfm.datasets.her2st("B4")\n'
                 'for a in [*train, b4]:\n'
                 '    stfm.pp.extract_features(a, "efficientnet_lite0")\n'
                 'model = stfm.tl.fit_expression(train, method="zinb", embedding_key="X_efficientnet_lite0", n_top_genes=50,\n'
                 '                               seed=0, **({"max_epochs": 5} if FAST else {}))\n'
                 'adata = b4[:, model.genes].copy()\n'
                 'stfm.tl.predict_expression(adata, model, library_size="predicted")\n'
                 'adata.layers["counts"] = adata.X.copy()\n'
                 'adata'),
        ("code", 'sq.gr.spatial_neighbors_grid(adata, n_neighs=4)\n'
                 'deg = np.asarray(adata.obsp["spatial_connectivities"].sum(1)).ravel()\n'
                 'print("neighbours per spot:", pd.Series(deg).value_counts().sort_index().to_dict())'),
        ("md", "Moran's I of every panel gene, measured (log1p counts) and predicted (log1p of the predicted mean):"),
        ("code", 'adata.layers["log_measured"] = np.log1p(adata.layers["counts"].toarray() if hasattr(adata.layers["counts"], "toarray") else adata.layers["counts"])\n'
                 'adata.layers["log_predicted"] = np.log1p(adata.layers["predicted"])\n'
                 'moran = {}\n'
                 'for layer in ("log_measured", "log_predicted"):\n'
                 '    sq.gr.spatial_autocorr(adata, mode="moran", layer=layer, n_perms=None, n_jobs=1)\n'
                 '    moran[layer] = adata.uns["moranI"]["I"]\n'
                 'moran = pd.DataFrame(moran)\n'
                 'ax = moran.plot.scatter("log_measured", "log_predicted", figsize=(4, 4))\n'
                 'ax.axline((0, 0), slope=1, color="grey", lw=0.8)\n'
                 'ax.set_title(f"Moran\'s I, r = {moran.corr().iloc[0, 1]:.2f}")\nplt.show()'),
        ("md", "Cancer regions from a marker signature (no reference labels needed), then the neighbourhood "
               "enrichment of the region classes on the same grid graph:"),
        ("code", 'full = b4.copy()\n'
                 'stfm.tl.detect_cancer_regions(full, method="signature")\n'
                 'adata.obs["cancer_region"] = full.obs["cancer_region"].astype("category")\n'
                 'print(adata.obs["cancer_region"].value_counts().to_dict())\n'
                 'sq.gr.nhood_enrichment(adata, cluster_key="cancer_region", seed=0, n_perms=100 if FAST else 1000, n_jobs=1,\n'
                 '                        show_progress_bar=False)\n'
                 'sq.pl.nhood_enrichment(adata, cluster_key="cancer_region", figsize=(3.5, 3.5))'),
    ],
    "04_cancer": [
        ("md", "# Cancer regions: fit on A1–D1, map B4\n\nA1, B1, C1 and D1 are the pathologist-annotated her2st "
               "sections (one per patient). One call trains from their counts: the classifier fits and stores its own "
               "label-free expression embedding (PCA, standardised within each section), pools it in rings around "
               "each spot, and fixes its threshold on held-out reference sections. B4, never seen by the fit, needs "
               "no preparation. Patients E–H are never read."),
        ("code", PARAMS),
        ("code", 'reference = {s: stfm.datasets.her2st(s) for s in ("A1", "B1", "C1", "D1")}\n'
                 'b4 = stfm.datasets.her2st("B4")\n'
                 'model = stfm.tl.fit_cancer_model(reference, **({"max_epochs": 3} if FAST else {}))\n'
                 'print("threshold fixed on held-out reference sections:", round(model.threshold_, 3),\n'
                 '      "| transfer:", model.calibration_["strategy"])\n'
                 'pd.DataFrame(model.validation_["sections"]).T[["auc", "n_spots", "n_positive"]]'),
        ("code", 'sdata = stfm.io.to_spatialdata(b4)\n'
                 'stfm.tl.detect_cancer_regions(sdata, model, shapes_added="B4_tumor")\n'
                 'table = sdata.tables["table"]\n'
                 'table.obs["cancer_region"].value_counts()'),
        ("md", "Regions over the H&E; *boundary* spots are non-tumour spots within one pitch of a tumour spot."),
        ("code", 'stfm.pl.cancer_regions(stfm.io.to_anndata(sdata, table_key="table"))'),
        ("md", "The score distribution per region, and the spots closest to the threshold (the ones a pathologist "
               "would look at first):"),
        ("code", 'obs = table.obs\n'
                 'ax = obs.boxplot("cancer_region_score", by="cancer_region", figsize=(5, 3))\n'
                 'ax.axhline(model.threshold_, color="red", lw=0.8)\nplt.suptitle("")\nplt.show()\n'
                 'obs.assign(margin=(obs["cancer_region_score"] - model.threshold_).abs()).nsmallest(5, "margin")[["cancer_region", "cancer_region_score"]]'),
        ("md", "The tumour polygons are a shapes element of the SpatialData object, drawn with spatialdata-plot:"),
        ("code", 'import spatialdata_plot  # registers .pl on SpatialData\n\n'
                 'image = next(k for k in sdata.images)\n'
                 'sdata.pl.render_images(image).pl.render_shapes("B4_tumor", fill_alpha=0.0, outline_alpha=1.0, outline_color="red", outline_width=1.5).pl.show(figsize=(5, 5))'),
    ],
    "05_whole_slide": [
        ("md", "# A whole H&E-only slide\n\nB4's H&E, treated as a slide with no spatial transcriptomics: a tissue "
               "grid of tiles, their embeddings, a model trained on patient C predicting every tile, and the "
               "prediction checked against B4's measured spots (the tile nearest to each)."),
        ("code", PARAMS),
        ("code", 'b4 = stfm.datasets.her2st("B4")\n'
                 'jpg = b4.uns["spatial"]["B4"]["metadata"]["source_image_path"]\n'
                 'mpp = b4.uns["spatial"]["B4"]["scalefactors"]["microns_per_pixel"]\n'
                 'sdata = stfm.pp.make_tiles(jpg, slide_mpp=mpp, tile_um=112)\n'
                 'tiles = sdata.tables["tiles_table"]\n'
                 'print(f"{tiles.n_obs} tissue tiles of 112 µm")\n'
                 'stfm.pp.extract_features(sdata, "efficientnet_lite0", table_key="tiles_table")'),
        ("code", 'names = ["C2", "C3"] if FAST else ["C2", "C3", "C4", "C5", "C6"]\n'
                 'train = [stfm.datasets.her2st(s) for s in names]\n'
                 'for a in train:\n'
                 '    stfm.pp.extract_features(a, "efficientnet_lite0")\n'
                 'model = stfm.tl.fit_expression(train, method="zinb", embedding_key="X_efficientnet_lite0", n_top_genes=50,\n'
                 '                               seed=0, **({"max_epochs": 5} if FAST else {}))\n'
                 'stfm.tl.predict_expression(sdata, model, table_key="tiles_table", library_size="predicted")\n'
                 'sdata.tables["tiles_table"]'),
        ("code", 'gene = "ERBB2" if "ERBB2" in model.genes else model.genes[0]\n'
                 'stfm.pl.spatial_pred(sdata, gene, table_key="tiles_table", compare=False)'),
        ("md", "Each measured spot against its nearest tile, and against the same model predicting the spots directly:"),
        ("code", 'from scipy.spatial import cKDTree\n\n'
                 'stfm.pp.extract_features(b4, "efficientnet_lite0")\n'
                 'tab = sdata.tables["tiles_table"]\n'
                 '_, nearest = cKDTree(tab.obsm["spatial"]).query(b4.obsm["spatial"])\n'
                 'truth = b4[:, model.genes].X.toarray()\n'
                 'on_tiles = np.asarray(tab[:, model.genes].layers["predicted"])[nearest]\n'
                 'on_spots = model.predict(b4, library_size="predicted")\n'
                 'pd.DataFrame({"tiles": stfm.model.validation_scores(on_tiles, truth), "spots": stfm.model.validation_scores(on_spots, truth)}).round(3)'),
    ],
}
# fmt: on


def build(*, execute: bool) -> None:
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=[new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        path = HERE / f"{name}.ipynb"
        if execute:
            from nbclient import NotebookClient

            env_fast = os.environ.pop("STFM_NOTEBOOK_FAST", None)
            try:
                NotebookClient(
                    nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
                ).execute()
            finally:
                if env_fast is not None:
                    os.environ["STFM_NOTEBOOK_FAST"] = env_fast
        nbformat.write(nb, path)
        print(f"wrote {path.relative_to(HERE.parent)}" + (" (executed)" if execute else ""))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--execute", action="store_true")
    ap.add_argument("--only", nargs="+", help="notebook names to build")
    args = ap.parse_args()
    if args.only:
        NOTEBOOKS = {k: v for k, v in NOTEBOOKS.items() if k in args.only}
    build(execute=args.execute)
