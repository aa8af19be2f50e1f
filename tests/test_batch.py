"""``stfm batch``: config checks, Dask LocalCluster runs, resume / skip, worker loss, serial equality, trainer pass-through."""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import needs_her2st

import stfm
from stfm.batch import BatchConfigError, check_config, compare_outputs, load_config, parse_config, run_batch

SLIDES = ("S2", "S3", "S4")


# --------------------------------------------------------------------------------------------------
# inputs: a synthetic cohort (embedding X_synthetic), a ridge model and a cancer classifier trained on S0, S1
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # 1280-d embeddings (efficientnet_lite0's width): wide enough that a matrix product's result depends on the
        # thread count, which the engine must neutralise; a small hires image, which the output must carry
        ad = stfm.datasets.synthetic_st(n_sections=5, grid=(8, 8), embedding_dim=1280, image=True, seed=0)
        z = ad.obsm["true_composition"][:, 0]
        ad.obs["pathologist_label"] = np.where(z > np.median(z), "invasive cancer", "connective tissue")
        secs = {}
        for s in ad.obs["section"].unique():
            a = ad[ad.obs["section"] == s].copy()
            a.uns["spatial"] = {s: a.uns["spatial"][s]}
            secs[s] = a
        train = [secs["S0"], secs["S1"]]
        stfm.tl.fit_expression(train, method="ridge", embedding_key="X_synthetic", n_top_genes=20).save(root / "ridge")
        stfm.tl.fit_cancer_model(train, use_rep="X_synthetic", max_epochs=2, validation="none").save(root / "cancer")
        for s in SLIDES:
            stfm.io.write_h5ad(secs[s], root / f"{s}.h5ad")
    return root


def write_config(root: Path, out: str, *, slides=SLIDES, extra_rows=(), steps=None, engine=None) -> Path:
    """A batch config in ``root`` writing to ``root / out``."""
    import yaml

    rows = [{"id": s, "input": f"{s}.h5ad", "platform": "synthetic"} for s in slides] + list(extra_rows)
    body = {
        "output": out,
        "steps": steps if steps is not None else {"expression": {"model": "ridge"}, "cancer": {"model": "cancer"}},
        "engine": {"retries": 2, **(engine or {})},
        "slides": rows,
    }
    path = root / f"{out}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def statuses(summary: pd.DataFrame) -> dict[str, str]:
    return dict(zip(summary["slide_id"], summary["status"]))


def assert_same_as(first: Path, second: Path, slides=SLIDES) -> None:
    for s in slides:
        diff = compare_outputs(first / f"{s}.zarr", second / f"{s}.zarr")
        assert diff == [], f"{s}: {diff}"


@pytest.fixture(scope="module")
def serial_reference(cohort):
    """A clean serial run (in this process, no Dask): what every other run must reproduce."""
    summary = run_batch(write_config(cohort, "ref"), serial=True, show_progress_bar=False)
    assert set(summary["status"]) == {"done"}
    return cohort / "ref"


# --------------------------------------------------------------------------------------------------
# one process cluster for the module: 2 workers, each pinned to a "GPU" (CUDA_VISIBLE_DEVICES=0 / 1) with
# resources={'GPU': 1}, as on a GPU node; on this CPU-only machine torch simply finds no CUDA device
# --------------------------------------------------------------------------------------------------
def _warm() -> str:
    import stfm.batch._task
    import stfm.model
    import stfm.tl

    stfm.tl.predict_expression  # noqa: B018 - import the stack once per worker
    stfm.model.load_model  # noqa: B018
    return os.environ.get("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="module")
def client():
    import cloudpickle
    from distributed import Client

    from stfm.batch import local_cluster

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cluster, n, _ = local_cluster({"processes": True, "gpus": [0, 1], "device": "auto", "threads_per_worker": 1})
    assert n == 2
    cl = Client(cluster, set_as_default=False)
    assert sorted(cl.run(_warm).values()) == ["0", "1"]
    info = cl.scheduler_info(n_workers=-1)["workers"]
    assert all(w["resources"] == {"GPU": 1} for w in info.values())
    yield cl
    cl.close()
    with contextlib.suppress(Exception):
        cluster.close(timeout=20)


def _crash_after_write_once(marker: str) -> None:
    """On a worker: the first SpatialData write anywhere stops half-way (its tables' obsm never lands), then the
    process dies, as a worker killed mid-write."""
    import shutil

    import spatialdata

    original = spatialdata.SpatialData.write

    def write(self, path, *args, **kwargs):
        original(self, path, *args, **kwargs)
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        shutil.rmtree(Path(path) / "tables" / "table" / "obsm", ignore_errors=True)  # half a store
        os._exit(1)

    spatialdata.SpatialData.write = write


def _set_allowed_failures(n: int, dask_scheduler=None) -> int:
    old = dask_scheduler.allowed_failures
    dask_scheduler.allowed_failures = n
    return old


# --------------------------------------------------------------------------------------------------
# configuration errors (no cluster needed)
# --------------------------------------------------------------------------------------------------
def test_yaml_and_toml_give_the_same_config(tmp_path):
    yaml_text = """
output: out
steps:
  features: {encoder: efficientnet_lite0, cache: false}
  expression: {model: models/ridge, library_size: 1e4}
engine: {n_workers: 2}
slides:
  - {id: B4, input: data/B4.h5ad, mpp: 0.688, platform: ST}
  - {id: wsi1, input: slides/wsi1.tif, mpp: 0.25, platform: H&E}
"""
    toml_text = """
output = "out"
[steps.features]
encoder = "efficientnet_lite0"
cache = false
[steps.expression]
model = "models/ridge"
library_size = 1e4
[engine]
n_workers = 2
[[slides]]
id = "B4"
input = "data/B4.h5ad"
mpp = 0.688
platform = "ST"
[[slides]]
id = "wsi1"
input = "slides/wsi1.tif"
mpp = 0.25
platform = "H&E"
"""
    (tmp_path / "c.yaml").write_text(yaml_text)
    (tmp_path / "c.toml").write_text(toml_text)
    a, b = load_config(tmp_path / "c.yaml"), load_config(tmp_path / "c.toml")
    assert a.slides == b.slides and a.steps == b.steps and a.output == b.output == tmp_path / "out"
    assert [s.kind for s in a.slides] == ["h5ad", "image"]
    assert a.slides[0].input == str(tmp_path / "data" / "B4.h5ad")  # relative to the config file
    assert a.steps["expression"]["model"] == str(tmp_path / "models" / "ridge")


def test_config_problems_are_listed_together(tmp_path):
    raw = {
        "output": "out",
        "steps": {"features": {"encoder": "efficientnet_lite0"}, "expresion": {"model": "m"}},
        "slides": [
            {"id": "a", "input": "a.h5ad", "colour": "red"},
            {"id": "A", "input": "b.h5ad"},
            {"id": "img", "input": "x.tif"},
            {"id": "bad/id", "input": "c.h5ad"},
            {"id": "what", "input": "c.unknown"},
        ],
        "engine": {"retries": -1},
    }
    with pytest.raises(BatchConfigError) as err:
        parse_config(raw, base=tmp_path)
    msg = str(err.value)
    assert "unknown step 'expresion' (did you mean 'expression'?)" in msg
    assert "unknown key(s) ['colour']" in msg
    assert "id also used by slides[0]" in msg
    assert "needs `mpp`" in msg
    assert "breaks SpatialData naming rules" in msg
    assert "cannot tell the input kind" in msg
    assert "engine.retries" in msg
    assert "7 problem(s)" in msg


def test_unknown_encoder_is_refused_before_any_slide(cohort):
    cfg = load_config(write_config(cohort, "enc", steps={"features": {"encoder": "uni_3_huge"}}))
    with pytest.raises(BatchConfigError, match=r"steps.features.encoder: Unknown encoder 'uni_3_huge'.*Known keys"):
        check_config(cfg)


def test_models_that_do_not_fit_the_config(cohort):
    # the ridge model was trained on obsm['X_synthetic'] (encoder 'synthetic'), not on efficientnet_lite0 features
    steps = {"features": {"encoder": "efficientnet_lite0"}, "expression": {"model": "ridge"}}
    with pytest.raises(BatchConfigError, match=r"trained on 'synthetic' embeddings.*efficientnet_lite0"):
        check_config(load_config(write_config(cohort, "m1", steps=steps)))
    gene = stfm.get.model_genes(stfm.model.load_model(cohort / "ridge"))[0]
    steps = {"expression": {"model": "ridge", "genes": ["NOT_A_GENE", gene]}}
    with pytest.raises(BatchConfigError, match=r"1 of 2 genes are not predicted.*NOT_A_GENE"):
        check_config(load_config(write_config(cohort, "m2", steps=steps)))
    steps = {"features": {"encoder": "efficientnet_lite0"}, "cancer": {"model": "cancer"}}
    with pytest.raises(BatchConfigError, match=r"reads `obsm\['X_synthetic'\]` but the features step writes"):
        check_config(load_config(write_config(cohort, "m3", steps=steps)))
    with pytest.raises(BatchConfigError, match=r"holds a CancerClassifier; it belongs under steps.cancer.model"):
        check_config(load_config(write_config(cohort, "m4", steps={"expression": {"model": "cancer"}})))
    with pytest.raises(BatchConfigError, match=r"steps.cancer.model: No model folder"):
        check_config(load_config(write_config(cohort, "m5", steps={"cancer": {"model": "nowhere"}})))


def test_scheduler_that_does_not_answer_fails_fast(cohort):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(
        ConnectionError, match=rf"Could not reach a Dask scheduler at 'tcp://127.0.0.1:{port}' within 2 s"
    ):
        run_batch(write_config(cohort, "nosched"), scheduler=f"tcp://127.0.0.1:{port}", connect_timeout=2,
                  show_progress_bar=False)  # fmt: skip
    assert time.perf_counter() - t0 < 15


def test_payloads_carry_paths_not_data(cohort):
    from stfm.batch._engine import make_payloads

    payloads = make_payloads(load_config(write_config(cohort, "pay")))
    assert [p["slide"]["input"] for p in payloads] == [str(cohort / f"{s}.h5ad") for s in SLIDES]
    assert all(len(pickle.dumps(p)) < 4000 for p in payloads)  # a few kB of paths and settings per slide


# --------------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------------
def test_cluster_run_matches_serial_then_skips(cohort, client, serial_reference):
    cfg = write_config(cohort, "dist", extra_rows=[{"id": "gone", "input": "missing/gone.h5ad"}])
    summary = run_batch(cfg, client=client, show_progress_bar=False)
    assert statuses(summary) == {"S2": "done", "S3": "done", "S4": "done", "gone": "failed"}
    err = summary.set_index("slide_id").loc["gone", "error"]
    assert "FileNotFoundError" in err and str(cohort / "missing" / "gone.h5ad") in err  # the path is named
    assert summary["worker"].str.startswith("tcp://").all()  # every slide ran on a worker
    # no slide data went through the scheduler: it saw the per-slide tasks and nothing else (no dask graph of
    # image chunks or tables submitted from inside a task)
    prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert prefixes and all(p.startswith("stfm-batch") for p in prefixes), prefixes
    assert_same_as(cohort / "dist", serial_reference)
    import spatialdata as sd

    table = sd.read_zarr(cohort / "dist" / "S2.zarr").tables["table"]
    assert {"cancer_region", "cancer_region_score"} <= set(table.obs) and table.uns["stfm"]["batch"]["hash"]
    assert "S2_hires_image" in sd.read_zarr(cohort / "dist" / "S2.zarr").images
    on_disk = pd.read_csv(cohort / "dist" / "summary.csv")
    assert list(on_disk["status"]) == ["done", "done", "done", "failed"]
    log = (cohort / "dist" / "batch.log").read_text()
    assert "slide gone failed: FileNotFoundError" in log and "slide S2 done" in log

    mtimes = {s: (cohort / "dist" / f"{s}.zarr").stat().st_mtime_ns for s in SLIDES}
    again = run_batch(cfg, client=client, show_progress_bar=False)
    assert statuses(again) == {"S2": "skipped", "S3": "skipped", "S4": "skipped", "gone": "failed"}
    assert list(again["n_obs"][:3]) == list(summary["n_obs"][:3])  # counts read back from the stored record
    assert {s: (cohort / "dist" / f"{s}.zarr").stat().st_mtime_ns for s in SLIDES} == mtimes  # untouched


def test_worker_killed_mid_write_is_retried(cohort, client, serial_reference, tmp_path):
    client.run(_crash_after_write_once, str(tmp_path / "crashed"))
    summary = run_batch(write_config(cohort, "killed"), client=client, show_progress_bar=False)
    assert (tmp_path / "crashed").exists()  # a worker did die
    assert statuses(summary) == dict.fromkeys(SLIDES, "done")
    assert_same_as(cohort / "killed", serial_reference)
    assert not [p.name for p in (cohort / "killed").iterdir() if ".stfm-" in p.name]  # no staging folder left


def test_rerun_after_a_lost_slide_finishes_only_the_rest(cohort, client, serial_reference, tmp_path):
    old = client.run_on_scheduler(_set_allowed_failures, 0)  # no second attempt: the slide is lost
    try:
        client.run(_crash_after_write_once, str(tmp_path / "crashed"))
        first = run_batch(write_config(cohort, "lost"), client=client, show_progress_bar=False)
    finally:
        client.run_on_scheduler(_set_allowed_failures, old)
    lost = [s for s, st in statuses(first).items() if st == "failed"]  # the running slide, and any queued behind it
    assert 1 <= len(lost) < len(SLIDES), statuses(first)
    assert all("worker running this slide died 1 time(s)" in e for e in first.set_index("slide_id").loc[lost, "error"])
    second = run_batch(write_config(cohort, "lost"), client=client, show_progress_bar=False)
    assert statuses(second) == {s: ("done" if s in lost else "skipped") for s in SLIDES}
    assert_same_as(cohort / "lost", serial_reference)


def test_changed_input_or_config_is_recomputed(cohort, tmp_path):
    import shutil

    import anndata as ad

    slides = ("S2", "S3")
    for s in slides:
        stfm.io.write_h5ad(ad.read_h5ad(cohort / f"{s}.h5ad"), tmp_path / f"{s}.h5ad")
    shutil.copytree(cohort / "ridge", tmp_path / "ridge")
    steps = {"expression": {"model": "ridge"}}
    cfg = write_config(tmp_path, "out", slides=slides, steps=steps)
    assert set(run_batch(cfg, serial=True, show_progress_bar=False)["status"]) == {"done"}
    size = (tmp_path / "S3.h5ad").stat().st_size
    a = ad.read_h5ad(tmp_path / "S3.h5ad")
    a.obsm["X_synthetic"] = a.obsm["X_synthetic"] * 1.5
    stfm.io.write_h5ad(a, tmp_path / "S3.h5ad")
    assert (tmp_path / "S3.h5ad").stat().st_size == size  # same size, other content: the hash reads the bytes
    shutil.copy(tmp_path / "S2.h5ad", tmp_path / "S2_copy.h5ad")
    (tmp_path / "S2_copy.h5ad").replace(tmp_path / "S2.h5ad")  # same bytes, new file and mtime: still valid
    assert statuses(run_batch(cfg, serial=True, show_progress_bar=False)) == {"S2": "skipped", "S3": "done"}
    cfg = write_config(tmp_path, "out", slides=slides, steps={"expression": {"model": "ridge", "library_size": 100}})
    assert statuses(run_batch(cfg, serial=True, show_progress_bar=False)) == {"S2": "done", "S3": "done"}


def test_cli(cohort, capsys):
    from stfm.__main__ import main

    cfg = write_config(cohort, "cli", slides=("S2",), extra_rows=[{"id": "gone", "input": "gone.h5ad"}])
    assert main(["batch", str(cfg), "--serial", "--no-progress"]) == 1  # a slide failed
    out = capsys.readouterr().out
    assert "1 done, 1 failed" in out and "gone.h5ad" in out
    cfg = write_config(cohort, "cli2", slides=("S2",))
    assert main(["batch", str(cfg), "--serial", "--no-progress"]) == 0
    assert main(["batch", str(cfg), "--serial", "--no-progress"]) == 0
    assert "1 skipped" in capsys.readouterr().out
    assert main(["batch", str(cfg), "--serial", "--no-progress", "--force"]) == 0
    assert "1 done" in capsys.readouterr().out
    bad = cohort / "bad.yaml"
    bad.write_text("output: x\nsteps: {colour: {}}\nslides: [{id: a, input: a.h5ad}]\n")
    assert main(["batch", str(bad), "--serial"]) == 2
    assert "unknown step 'colour'" in capsys.readouterr().err


@needs_her2st
def test_features_on_real_images_and_an_he_only_slide(tmp_path):
    """her2st B4 (25 spots, full-resolution JPEG) and a crop of it given as an H&E-only PNG: features + ridge."""
    from conftest import load_section
    from PIL import Image

    b4 = load_section("B4")
    meta = b4.uns["spatial"]["B4"]
    train = b4[100:140].copy()
    train.obs["section"] = np.repeat(["B4a", "B4b"], 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stfm.pp.extract_features(train, "efficientnet_lite0", show_progress_bar=False)
        stfm.tl.fit_expression(train, method="ridge", embedding_key="X_efficientnet_lite0", n_top_genes=8).save(
            tmp_path / "ridge"
        )
    stfm.io.write_h5ad(b4[:25, :200].copy(), tmp_path / "B4.h5ad")  # few genes: the model predicts its own panel
    x, y = b4.obsm["spatial"][0].astype(int)
    with Image.open(meta["metadata"]["source_image_path"]) as img:
        img.crop((x - 400, y - 400, x + 400, y + 400)).save(tmp_path / "he.png")
    mpp = float(meta["scalefactors"]["microns_per_pixel"])
    (tmp_path / "b.toml").write_text(f"""
output = "out"
[steps.features]
encoder = "efficientnet_lite0"
[steps.expression]
model = "ridge"
[tiles]
min_tissue_fraction = 0.1
[[slides]]
id = "B4"
input = "B4.h5ad"
[[slides]]
id = "he"
input = "he.png"
mpp = {mpp}
platform = "H&E"
""")
    summary = run_batch(tmp_path / "b.toml", serial=True, show_progress_bar=False)
    assert statuses(summary) == {"B4": "done", "he": "done"}, summary["error"].tolist()
    import spatialdata as sd

    spots, tiles = sd.read_zarr(tmp_path / "out" / "B4.zarr"), sd.read_zarr(tmp_path / "out" / "he.zarr")
    assert spots.tables["table"].obsm["X_efficientnet_lite0"].shape == (25, 1280)
    assert spots.tables["predicted"].shape == (25, 8) and "B4_hires_image" in spots.images
    assert "tiles" in tiles.shapes and tiles.tables["predicted"].n_obs == tiles.tables["tiles_table"].n_obs > 0
    assert tiles.tables["tiles_table"].uns["stfm"]["batch"]["kind"] == "image"
    np.testing.assert_array_equal(
        spots.tables["table"].obsm["X_efficientnet_lite0"],
        stfm.pp.extract_features(b4[:25].copy(), "efficientnet_lite0", inplace=False, show_progress_bar=False),
    )


# --------------------------------------------------------------------------------------------------
# training at scale: accelerator / devices / strategy reach Lightning
# --------------------------------------------------------------------------------------------------
def _labelled(n_sections=2):
    ad = stfm.datasets.synthetic_st(n_sections=n_sections, grid=(6, 6), seed=1)
    z = ad.obsm["true_composition"][:, 0]
    ad.obs["pathologist_label"] = np.where(z > np.median(z), "invasive cancer", "connective tissue")
    return ad


def test_fit_expression_passes_trainer_arguments_to_lightning():
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.strategies import SingleDeviceStrategy

    strategy = SingleDeviceStrategy(device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = stfm.tl.fit_expression(_labelled(3), method="zinb", embedding_key="X_synthetic", n_top_genes=10,
                                       max_epochs=1, train_kwargs={"accelerator": "cpu", "devices": 1, "strategy": strategy})  # fmt: skip
    assert model.trainer.strategy is strategy
    assert isinstance(model.trainer.accelerator, CPUAccelerator) and model.trainer.num_devices == 1


def test_fit_cancer_model_passes_trainer_arguments_to_lightning():
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.strategies import SingleDeviceStrategy

    strategy = SingleDeviceStrategy(device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = stfm.tl.fit_cancer_model(_labelled(), use_rep="X_synthetic", max_epochs=1, validation="none",
                                         accelerator="cpu", devices=1, strategy=strategy)  # fmt: skip
        default = stfm.tl.fit_cancer_model(_labelled(), use_rep="X_synthetic", max_epochs=1, validation="none")
    assert model.trainer.strategy is strategy and isinstance(model.trainer.accelerator, CPUAccelerator)
    assert isinstance(default.trainer.accelerator, CPUAccelerator) and default.trainer.num_devices == 1  # 'auto' here


@pytest.mark.slow
def test_fit_cancer_model_ddp_on_two_cpu_processes(monkeypatch):
    """DDP with two CPU processes (gloo), ``strategy='ddp_spawn_find_unused_parameters_true'``: about 15 s."""
    import torch

    from stfm.model import CancerClassifier

    ad = _labelled()
    kw = {"use_rep": "X_synthetic", "max_epochs": 3, "validation": "none", "accelerator": "cpu"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with monkeypatch.context() as m:  # the same model (same seed), never trained: the starting weights
            m.setattr(CancerClassifier, "train", lambda self, **kwargs: None)
            start = stfm.tl.fit_cancer_model(ad, **kw)
        model = stfm.tl.fit_cancer_model(ad, devices=2, strategy="ddp_spawn_find_unused_parameters_true", **kw)
        score = model.predict(ad)
    assert type(model.trainer.strategy).__name__ == "DDPStrategy" and model.trainer.num_devices == 2
    assert model.trainer.world_size == 2
    before, after = start.module.state_dict(), model.module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the trained weights came back from rank 0
    assert score.shape == (ad.n_obs,) and np.isfinite(score).all()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["zinb", "hetero_graph"])  # spot minibatches; graph batches
def test_fit_expression_ddp_on_two_cpu_processes(method):
    """Expression training with two CPU processes (gloo, ``ddp_spawn``): the weights, the validation history and the
    epoch chosen on it come back from the workers."""
    import torch

    cohort = stfm.datasets.synthetic_st(n_sections=3, n_patients=2, grid=(10, 10), n_genes=40)
    kw = {"method": method, "embedding_key": "X_synthetic", "n_top_genes": 20, "seed": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = stfm.tl.fit_expression(cohort, max_epochs=1, train_kwargs={"accelerator": "cpu"}, **kw)
        model = stfm.tl.fit_expression(cohort, max_epochs=4, train_kwargs={"accelerator": "cpu", "devices": 2,
                                                                           "strategy": "ddp_spawn_find_unused_parameters_true"}, **kw)  # fmt: skip
    assert type(model.trainer.strategy).__name__ == "DDPStrategy" and model.trainer.world_size == 2
    hist = model.validation_history_
    assert hist is not None and list(hist["epoch"]) == [0, 1, 2, 3]  # one row per epoch, from rank 0
    assert model.best_epoch_ == int(hist["epoch"][hist["score"].idxmax()])
    before, after = start.module.state_dict(), model.module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    pred = model.predict()
    assert np.isfinite(pred).all() and pred.shape == (cohort.n_obs, 20)
