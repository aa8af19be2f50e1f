"""Compare cancer-model settings on INNER validation only (her2st A1, B1, C1, D1).

For each outer fold the test section is dropped before anything runs; the model is fitted on the three
reference sections with `fit_cancer_model`, whose held-out-reference-section models give per-section AUCs
(`model.validation_`). The script prints their mean for one setting, given as JSON::

    STFM_DATA_DIR=../shared/data python benchmarks/cancer_inner_validation.py '{"method": "pca", "section_z": true, "scales": [1, 2, 4, 8]}'

Keys: method ('pca' | 'scvi' | 'stored': `fit_cancer_model`'s own stored embedding, its defaults unless
overridden by scales / epochs / model_kwargs / criterion / standardize), n_comps, scvi_epochs, section_z (standardize='section'; the recorded results used an equivalent in-script version with std + 1e-6), epochs, seed, scales,
n_sectors, model_kwargs, criterion ('f1' | 'youden'), standardize ('section' | 'none', 'stored' only). For
'stored' the output also has the nested threshold-transfer result of the transfer each fit chose (mean F1 and
specificity over the reference sections, reference labels only). Results of the settings compared so far: benchmarks/results/cancer_inner_validation.jsonl
(see docs/benchmarks/cancer.md, Run 4).
"""
import json
import logging
import sys
import time
import warnings

import numpy as np
import torch

warnings.simplefilter("ignore")
torch.set_num_threads(1)
logging.disable(logging.WARNING)
import stfm  # noqa: E402  (after the thread and logging settings)

stfm.settings.show_progress_bar = False
cfg = json.loads(sys.argv[1])
S = ["A1", "B1", "C1", "D1"]
secs = {s: stfm.datasets.her2st(s) for s in S}
res, nested = {}, {}
t0 = time.time()
for test in S:
    ref = [s for s in S if s != test]
    fold = {s: secs[s].copy() for s in S}
    del fold[test]  # the test section plays no part at all here
    if cfg.get("method") == "stored":
        kw = {k: (tuple(v) if k == "scales" else v) for k, v in cfg.items() if k in ("scales", "n_sectors", "model_kwargs", "standardize", "n_comps")}
        m = stfm.tl.fit_cancer_model({s: fold[s] for s in ref}, max_epochs=cfg.get("epochs", 30), seed=cfg.get("seed", 0),
                                     threshold_criterion=cfg.get("criterion", "f1"), **kw)  # fmt: skip
        res[test] = {k: round(v["auc"], 3) for k, v in m.validation_["sections"].items()}
        chosen = m.calibration_["strategy"]
        nested[test] = {"transfer": chosen, **{k: round(m.validation_["threshold_transfer"][chosen][k], 4)
                                               for k in ("mean_f1", "mean_specificity", "mean_sensitivity", "mean_ece")}}  # fmt: skip
        continue
    stfm.tl.expression_embedding(fold, method=cfg.get("method", "pca"), reference=ref, n_comps=cfg.get("n_comps", 16),
                                 max_epochs=cfg.get("scvi_epochs", 100), seed=0,
                                 standardize="section" if cfg.get("section_z") else "none")
    key = {"pca": "X_pca_expr", "scvi": "X_scvi_expr"}[cfg.get("method", "pca")]
    m = stfm.tl.fit_cancer_model({s: fold[s] for s in ref}, label_key="pathologist_label",
        positive=("invasive cancer", "cancer in situ"), ignore=("undetermined",), expr_rep=key,
        max_epochs=cfg.get("epochs", 30), seed=cfg.get("seed", 0), scales=tuple(cfg.get("scales", (1.0, 2.0, 4.0))),
        n_sectors=cfg.get("n_sectors", 4), model_kwargs=cfg.get("model_kwargs"))
    res[test] = {k: round(v["auc"], 3) for k, v in m.validation_["sections"].items()}
inner = [v for d in res.values() for v in d.values()]
out = {"cfg": cfg, "mean_inner_auc": round(float(np.mean(inner)), 4), "by_outer_fold": res, "min": round(time.time() - t0) / 60}
if nested:
    out["nested_transfer"] = nested
    out["mean_nested_f1"] = round(float(np.mean([v["mean_f1"] for v in nested.values()])), 4)
    out["mean_nested_specificity"] = round(float(np.mean([v["mean_specificity"] for v in nested.values()])), 4)
print(json.dumps(out), flush=True)
