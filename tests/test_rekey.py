"""What a changed setting re-runs on a finished run (issue 12): an evaluation setting re-runs
`evaluate` alone, a detector setting re-scores the stored embeddings in `reduce` without decoding an
image, a list-valued key hashes like any other, and a stage whose outputs come out the same keeps
the stages downstream of it (early cutoff)."""

from __future__ import annotations

import copy
import json
import tarfile

import h5py
import numpy as np
import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from clipbd import runstate
from clipbd.config import PIPELINE, STAGE_ORDER

pytestmark = pytest.mark.slow


@pytest.fixture
def finished(tiny_cfg) -> DictConfig:
    """The tiny pipeline run to completion in-process (in-batch DAO/SLOF/k-dist/LID + CLIPScore)."""
    with open_dict(tiny_cfg.detector):
        tiny_cfg.detector.clipscore = {"_target_": "clipbd.detectors.clipscore.CLIPScore"}
    for name in PIPELINE:
        runstate.run_stage(tiny_cfg, name)
    return tiny_cfg


def stale(cfg: DictConfig) -> list[str]:
    """The stages whose outputs no longer match the config (a stage that re-runs and comes out the
    same leaves its dependants complete: early cutoff, tested below)."""
    return [name for name in PIPELINE if not runstate.is_complete(cfg, name)]


def clone(cfg: DictConfig) -> DictConfig:
    return copy.deepcopy(cfg)


def test_evaluation_settings_re_run_evaluate_only(finished):
    assert stale(finished) == []
    for key, value in [("dataset.label_key", "class"), ("eval.prompts_per_class", 4),
                       ("dataset.classes", ["circle", "square", "triangle", "star", "cross", "heart", "ring",
                                            "banana"])]:
        cfg = clone(finished)
        OmegaConf.update(cfg, key, value, merge=False)
        assert stale(cfg) == (["poison", "evaluate"] if key == "dataset.classes" else ["evaluate"]), key


def test_dataset_classes_re_draws_the_plan_but_keeps_the_model(finished):
    """poison reads dataset.classes (the target-class check), so it re-runs; the plan comes out the
    same, so its id stays and pretraining, extraction and scoring are kept (early cutoff)."""
    cfg = clone(finished)
    OmegaConf.update(cfg, "dataset.classes", ["circle", "square", "triangle", "star", "cross", "heart", "ring",
                                              "banana"], merge=False)
    before = runstate.read_marker(cfg.run_dir, "poison")
    runstate.run_stage(cfg, "poison")
    after = runstate.read_marker(cfg.run_dir, "poison")
    assert after["key"] != before["key"] and after["id"] == before["key"]
    assert [s for s in ("pretrain", "extract", "reduce") if not runstate.is_complete(cfg, s)] == []


def test_detector_change_re_scores_without_decoding_an_image(finished, monkeypatch):
    cfg = clone(finished)
    with h5py.File(f"{cfg.run_dir}/scores.h5") as f:
        old = {d: f[d][()] for d in ("dao", "slof", "kdist", "lid", "clipscore")}
    OmegaConf.update(cfg, "detector.dao.k", 8)
    # scoring re-runs; the report page, which shows the scores, follows it (its thumbnails are the
    # only images it reads: the top of the new ranking, not the corpus)
    assert stale(cfg) == ["reduce", "report"]

    def refuse(*a, **kw):
        raise AssertionError("an image or a shard was read while re-scoring")

    import clipbd.data.loader as loader
    import clipbd.data.shards as shards

    monkeypatch.setattr(shards, "decode_image", refuse)
    monkeypatch.setattr(loader, "decode_image", refuse)
    monkeypatch.setattr(tarfile, "open", refuse)
    for name in PIPELINE[:-2]:  # report and evaluate read images; evaluate's key did not change
        runstate.run_stage(cfg, name)
    monkeypatch.undo()
    runstate.run_stage(cfg, "report")
    with h5py.File(f"{cfg.run_dir}/scores.h5") as f:
        new = {d: f[d][()] for d in old}
    assert not np.array_equal(new["dao"], old["dao"])
    for d in ("slof", "kdist", "lid", "clipscore"):
        assert np.array_equal(new[d], old[d]), d
    assert stale(cfg) == []


def _list_nodes(node, prefix=""):
    """Every list-valued key under `node` (full dotted keys)."""
    for k in node:
        v = node._get_node(k)
        full = f"{prefix}{k}"
        if isinstance(v, ListConfig):
            yield full
        elif isinstance(v, DictConfig):
            yield from _list_nodes(v, full + ".")


def test_list_values_hash_in_every_keyed_section(tiny_cfg):
    """`_select` turns lists (ListConfig) into plain data at any depth; every stage's key can be
    formed with list values in the keys it reads (once: TypeError 'not JSON serialisable')."""
    OmegaConf.update(tiny_cfg, "dataset.test_shards", ["/data/a.tar", "/data/b.tar"], merge=False)
    OmegaConf.update(tiny_cfg, "dataset.classes", ["circle", "banana"], merge=False)
    OmegaConf.update(tiny_cfg, "extract.groups", [0, 1], merge=False)
    OmegaConf.update(tiny_cfg, "scoring.bank_source", ["/data/c.tar"], merge=False)
    lists = list(_list_nodes(tiny_cfg))
    assert {"dataset.test_shards", "dataset.classes", "scoring.bank_source",
            "dataset.synthetic.world.class_weights"} <= set(lists)
    for key in lists:
        assert isinstance(runstate._select(tiny_cfg, key), list), key
    keys = {name: runstate.stage_key(tiny_cfg, name) for name in STAGE_ORDER}
    OmegaConf.update(tiny_cfg, "dataset.test_shards", ["/data/a.tar"], merge=False)
    assert runstate.stage_key(tiny_cfg, "evaluate") != keys["evaluate"]
    assert runstate.stage_key(tiny_cfg, "pretrain") == keys["pretrain"]


def test_list_valued_test_shards_and_classes_evaluate(finished):
    """The issue's crash: list-valued dataset.test_shards and dataset.classes through `evaluate`
    (same shards, same classes as the default: the same accuracy)."""
    import json
    from pathlib import Path

    run = Path(finished.run_dir)
    before = json.loads((run / "metrics.json").read_text())
    cfg = clone(finished)
    tests = json.loads((run / "data.json").read_text())["test_shards"]
    OmegaConf.update(cfg, "dataset.test_shards", tests, merge=False)
    OmegaConf.update(cfg, "dataset.classes", ["circle", "square", "triangle", "star", "cross", "heart", "ring",
                                              "banana"], merge=False)
    assert stale(cfg) == ["poison", "evaluate"]
    for name in PIPELINE:
        runstate.run_stage(cfg, name)
    after = json.loads((run / "metrics.json").read_text())
    assert after["eval/clean_acc"] == before["eval/clean_acc"] and after["attack/asr"] == before["attack/asr"]
    assert stale(cfg) == []


def _pretrain_marker(cfg: DictConfig) -> dict:
    return runstate.read_marker(cfg.run_dir, "pretrain")


def test_a_larger_test_split_re_evaluates_without_retraining(finished):
    """dataset.synthetic.num_test: the data stage writes the larger split (the training shards come
    out byte for byte the same), evaluate reads it; pretraining and scoring are kept (issue 18: the
    default's 10,000 test images, measured on models trained before with 2,000)."""
    import json
    from pathlib import Path

    run = Path(finished.run_dir)
    n = finished.dataset.synthetic.num_test
    before, trained = json.loads((run / "data.json").read_text()), _pretrain_marker(finished)
    cfg = clone(finished)
    OmegaConf.update(cfg, "dataset.synthetic.num_test", 2 * n)
    assert stale(cfg) == ["data", "evaluate"]
    for name in PIPELINE:
        runstate.run_stage(cfg, name)
    after = json.loads((run / "data.json").read_text())
    assert after["fingerprint"] == before["fingerprint"] and len(after["test_shards"]) > len(before["test_shards"])
    assert _pretrain_marker(cfg) == trained and stale(cfg) == []
    assert runstate.read_marker(cfg.run_dir, "data")["identity"].startswith("train:")


def test_a_data_marker_of_the_old_identity_scheme_keeps_its_model(finished):
    """A run made before the data stage's identity left the test split out (no `train:` scheme, a
    hash that covered the test shards too) is re-identified from its files when the data stage runs
    again: its model is kept."""
    path = runstate.marker_path(finished.run_dir, "data")
    marker = json.loads(path.read_text())
    marker["identity"] = "0123456789abcdef"  # an identity of the old scheme: not comparable
    path.write_text(json.dumps(marker))
    trained = _pretrain_marker(finished)
    cfg = clone(finished)
    OmegaConf.update(cfg, "dataset.synthetic.num_test", 2 * cfg.dataset.synthetic.num_test)
    runstate.run_stage(cfg, "data")
    assert runstate.read_marker(cfg.run_dir, "data")["id"] == marker["id"]
    assert runstate.is_complete(cfg, "pretrain") and _pretrain_marker(cfg) == trained
