"""Safe, atomic model folders: nothing is unpickled, every fault is an stfm error that says what to do."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

import stfm
from stfm.model import CheckpointError

EMB = "X_synthetic"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def cohort():
    return stfm.datasets.synthetic_st(n_sections=3, n_patients=1, n_genes=20, grid=(8, 8), seed=2)


@pytest.fixture(scope="module")
def models(cohort):
    return {
        "zinb": stfm.tl.fit_expression(cohort, method="zinb", embedding_key=EMB, n_top_genes=10, max_epochs=2),
        "ridge": stfm.tl.fit_expression(cohort, method="ridge", embedding_key=EMB, n_top_genes=10),
        "retrieval": stfm.tl.fit_expression(cohort, method="retrieval", embedding_key=EMB, n_top_genes=10, max_epochs=2),
    }


class _Payload:
    """Unpickling this object writes a marker file: proof that a pickle ran code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_never_runs(models, cohort, tmp_path):
    import torch

    marker = tmp_path / "pwned"
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"model_state_dict": {}, "attr_dict": {"x": _Payload(str(marker))}}, bad / "model.pt")
    # the payload is live: plain unpickling runs it
    with open(bad / "model.pt", "rb") as fh:
        torch.load(fh, weights_only=False)
    assert marker.exists()
    marker.unlink()
    for load in (
        stfm.model.load_model,
        stfm.model.ExpressionPredictor.load,
        stfm.model.RidgeProbe.load,
        stfm.model.CancerClassifier.load,
        stfm.get.model_genes,
        lambda p: stfm.tl.predict_expression(cohort[:5].copy(), p),
    ):
        with pytest.raises(CheckpointError, match=r"model\.pt.*does not unpickle model files"):
            load(bad)
        assert not marker.exists()


@pytest.mark.parametrize("method", ["zinb", "ridge", "retrieval"])
def test_faults_become_stfm_errors(method, models, tmp_path):
    model = models[method]
    path = tmp_path / method
    model.save(path)
    # missing folder / a file / empty folder
    with pytest.raises(FileNotFoundError, match="No model folder"):
        stfm.model.load_model(tmp_path / "nothing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        stfm.model.load_model(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is empty"):
        stfm.model.load_model(tmp_path / "empty")
    # another class
    other = {"zinb": stfm.model.RidgeProbe, "ridge": stfm.model.RetrievalPredictor, "retrieval": stfm.model.ExpressionPredictor}[method]
    with pytest.raises(CheckpointError, match=rf"holds a '{type(model).__name__}' model.*load_model"):
        other.load(path)
    # truncated weights
    w = path / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        stfm.model.load_model(path)
    w.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        stfm.model.load_model(path)
    w.unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        stfm.model.load_model(path)
    # truncated / foreign / future metadata
    model.save(path, overwrite=True)
    meta = path / "stfm_model.json"
    text = meta.read_text()
    meta.write_text(text[: len(text) // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        stfm.model.load_model(path)
    body = json.loads(text)
    meta.write_text(json.dumps({**body, "format_version": 99}))
    with pytest.raises(CheckpointError, match="newer stfm"):
        stfm.model.load_model(path)
    meta.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not an stfm model description"):
        stfm.model.load_model(path)


def test_weights_that_do_not_fit_the_settings(models, tmp_path):
    from safetensors.torch import load_file, save_file

    models["zinb"].save(tmp_path / "z")
    state = load_file(str(tmp_path / "z" / "model.safetensors"))
    key = next(k for k in state if k.endswith("scale_head.weight"))
    state[key] = state[key][:3]
    save_file(state, str(tmp_path / "z" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"do not fit the model.*scale_head"):
        stfm.model.load_model(tmp_path / "z")


def test_retrieval_folder_without_its_bank(models, tmp_path):
    from safetensors.torch import load_file, save_file

    models["retrieval"].save(tmp_path / "r")
    state = load_file(str(tmp_path / "r" / "model.safetensors"))
    state = {k: v for k, v in state.items() if not k.startswith("bank_")}
    save_file(state, str(tmp_path / "r" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no reference bank"):
        stfm.model.load_model(tmp_path / "r")


def test_files_hold_only_tensors_and_json(models, tmp_path):
    for name, m in models.items():
        m.save(tmp_path / name)
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["model.safetensors", "stfm_model.json"]
        meta = json.loads((tmp_path / name / "stfm_model.json").read_text())
        assert meta["method"] == name and meta["class"] == type(m).__name__ and meta["format"] == "stfm-model"
        with pytest.raises(pickle.UnpicklingError):  # not a pickle at all
            pickle.loads((tmp_path / name / "model.safetensors").read_bytes())


def test_atomic_overwrite_keeps_old_on_failure(models, cohort, tmp_path, monkeypatch):
    from stfm.model import _persist

    path = tmp_path / "m"
    models["ridge"].save(path)
    before = stfm.model.load_model(path).predict(cohort)
    with pytest.raises(FileExistsError, match="already exists"):
        models["zinb"].save(path)

    def boom(folder, state):
        (folder / "model.safetensors").write_bytes(b"partial")
        msg = "disk full"
        raise OSError(msg)

    monkeypatch.setattr(_persist, "write_weights", boom)
    with pytest.raises(OSError, match="disk full"):
        models["zinb"].save(path, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary left behind
    np.testing.assert_array_equal(stfm.model.load_model(path).predict(cohort), before)  # the old model, intact
    models["zinb"].save(path, overwrite=True)
    assert type(stfm.model.load_model(path)) is stfm.model.ExpressionPredictor


def test_stale_temporaries_are_removed_on_the_next_write(models, tmp_path):
    stale = tmp_path / ".m.stfm-tmp-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    models["ridge"].save(tmp_path / "m")
    assert not stale.exists()


def test_ensemble_saves_as_one_folder(cohort, tmp_path):
    ens = stfm.tl.fit_expression(cohort, method="ridge", embedding_key=EMB, n_top_genes=8, n_models=2)
    assert isinstance(ens, stfm.model.ExpressionEnsemble)
    ens.save(tmp_path / "e")
    back = stfm.model.load_model(tmp_path / "e")
    assert isinstance(back, stfm.model.ExpressionEnsemble) and len(back.members) == 2
    np.testing.assert_allclose(back.predict(cohort), ens.predict(cohort), rtol=1e-5)


def test_ensembles_fitted_with_different_seeds_share_no_member(cohort):
    """Member i of an ensemble is seeded ``seed * n_models + i``: with ``seed + i`` the ensembles of seeds 0 and 1
    shared a member, and a spread over benchmark seeds understated the seed variance."""
    import torch

    fits = [stfm.tl.fit_expression(cohort, method="zinb", embedding_key=EMB, n_top_genes=8, n_models=2, seed=s,
                                   max_epochs=1) for s in (0, 1)]  # fmt: skip
    weights = [torch.cat([p.detach().ravel() for p in m.module.parameters()]) for e in fits for m in e.members]
    for i in range(len(weights)):
        for j in range(i + 1, len(weights)):
            assert not torch.equal(weights[i], weights[j]), f"members {i} and {j} were trained with the same seed"
