"""End-to-end: a tiny run of every stage through the CLI, its artifacts, re-runs and bad input."""

from __future__ import annotations

import csv
import io
import json
import shutil
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from conftest import run_cli

pytestmark = pytest.mark.slow

DETECTORS = ["dao", "slof", "kdist", "lid"]
EXPECTED_KEYS = {"attack/asr", "attack/asr_incl_target", "attack/bd_acc", "eval/clean_acc"} | {
    f"detect/{d}/{m}" for d in DETECTORS for m in ("auroc", "auprc", "fpr95")}


def test_smoke_run_produces_every_artifact(smoke_run):
    run_dir, _ = smoke_run
    for rel in ["config.yaml", "meta.json", "data_index.h5", "data.json", "poison_plan.json",
                "checkpoints/latest.pt", "checkpoints/epoch_1.pt", "scores.h5", "ranked.csv",
                "metrics.json", "timing.json", "plots/roc.png", "plots/score_hist.png", "run.log"]:
        assert (run_dir / rel).is_file(), rel
    assert len(list((run_dir / "shards").glob("extract-*.h5"))) == 2  # 4 shards, 2 per group
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline run missing"
    assert json.loads((run_dir / "meta.json").read_text())["git"]
    assert 0 < json.loads((run_dir / "meta.json").read_text())["startup_s"] < 120  # reported, per invocation
    trained_on = json.loads((run_dir / "stages" / "pretrain.json").read_text())["machine"]
    assert trained_on["threads"] >= 1 and trained_on["world"] == 1 and trained_on["cpu"]


def test_metrics_have_exactly_the_documented_keys(smoke_run):
    metrics = json.loads((smoke_run[0] / "metrics.json").read_text())
    assert set(metrics) == EXPECTED_KEYS
    for k, v in metrics.items():
        assert 0.0 <= v <= 1.0, (k, v)
    # each AUROC is the one of the stored scores against the poison plan (not just any number in [0, 1])
    plan = json.loads((smoke_run[0] / "poison_plan.json").read_text())
    with h5py.File(smoke_run[0] / "scores.h5", "r") as f:
        labels = np.isin(f["index"][()], plan["poison_indices"])
        assert labels.sum() == plan["poison_count"] > 0
        for d in DETECTORS:
            want = roc_auc_score(labels, f[d][()])
            assert metrics[f"detect/{d}/auroc"] == pytest.approx(want, abs=1e-12), d


def test_scores_cover_every_sample_once_and_match_plan(smoke_run):
    run_dir = smoke_run[0]
    plan = json.loads((run_dir / "poison_plan.json").read_text())
    with h5py.File(run_dir / "scores.h5", "r") as f:
        assert np.array_equal(f["index"][()], np.arange(400))
        assert f["is_poison"][()].sum() == plan["poison_count"] == 8
        assert set(np.nonzero(f["is_poison"][()])[0]) == set(plan["poison_indices"])
        for d in DETECTORS:
            assert f[d].shape == (400,) and np.isfinite(f[d][()]).all()
    with open(run_dir / "ranked.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 400 and len({r["index"] for r in rows}) == 400
    dao = [float(r["dao"]) for r in rows]
    assert dao == sorted(dao, reverse=True)  # most suspicious first
    poisoned = {int(r["index"]) for r in rows if r["is_poison"] == "1"}
    assert poisoned == set(plan["poison_indices"])
    assert all(r["caption"] in plan["poison_text"] for r in rows if r["is_poison"] == "1")


def test_rerun_skips_finished_stages(smoke_run):
    run_dir = smoke_run[0]
    ckpt_mtime = (run_dir / "checkpoints" / "latest.pt").stat().st_mtime
    timing = json.loads((run_dir / "timing.json").read_text())
    proc = run_cli("+experiment=smoke", f"hydra.run.dir={run_dir}")
    for stage in ["data", "poison", "pretrain", "extract", "reduce", "report", "evaluate"]:
        assert f"stage {stage:<8} complete, skipped" in proc.stderr, stage
    assert (run_dir / "checkpoints" / "latest.pt").stat().st_mtime == ckpt_mtime
    # timing.json keeps what the outputs cost, not the seconds the skips took
    assert json.loads((run_dir / "timing.json").read_text()) == timing
    marker = json.loads((run_dir / "stages" / "pretrain.json").read_text())
    assert timing["time/pretrain_s"] == round(marker["seconds"], 2) > 0


def test_resumed_pretraining_continues_and_counts_earlier_seconds(tmp_path):
    import torch

    run_dir = tmp_path / "resume"
    args = ["+experiment=smoke", f"hydra.run.dir={run_dir}", "stages=[data,poison,pretrain]", "train.epochs=2",
            "train.checkpoint_every=1"]
    run_cli(*args)
    ckpt = run_dir / "checkpoints"
    full = torch.load(ckpt / "epoch_2.pt", map_location="cpu", weights_only=True)
    first = torch.load(ckpt / "epoch_1.pt", map_location="cpu", weights_only=True)
    assert 0 < first["elapsed_s"] < full["elapsed_s"]
    # as if killed during epoch 2: latest is epoch 1, the stage never finished
    (run_dir / "stages" / "pretrain.json").unlink()
    (ckpt / "epoch_2.pt").unlink()
    shutil.copyfile(ckpt / "epoch_1.pt", ckpt / "latest.pt")
    proc = run_cli(*args)
    assert "resuming from" in proc.stderr and "epoch 1 done" in proc.stderr
    assert "epoch 1/2" not in proc.stderr.split("resuming from")[1]  # only epoch 2 trained again
    resumed = torch.load(ckpt / "epoch_2.pt", map_location="cpu", weights_only=True)
    for name, value in full["model"].items():  # same data order and state: the same model
        assert torch.allclose(resumed["model"][name], value, atol=1e-6), name
    marker = json.loads((run_dir / "stages" / "pretrain.json").read_text())
    assert marker["seconds"] >= first["elapsed_s"]  # counts the interrupted attempt's epoch
    assert json.loads((run_dir / "timing.json").read_text())["time/pretrain_s"] == round(marker["seconds"], 2)
    assert not list((run_dir / "stages").glob(".*"))  # no stray files beside the markers


def test_branching_from_a_shorter_run_before_its_decay_gives_the_longer_run(tmp_path):
    import torch

    # wsd over 6 steps an epoch: a 4-epoch run lowers its rate from step 20, a 5-epoch one from 25; both
    # hold the peak rate through epoch 3 (step 17), so the 4-epoch run's epoch 3 is the 5-epoch run's
    base = ["+experiment=smoke", "stages=[data,poison,pretrain]", "train.schedule=wsd", "train.checkpoint_every=1"]
    short, scratch, branched = tmp_path / "e4", tmp_path / "e5", tmp_path / "e5b"
    run_cli(*base, f"hydra.run.dir={short}", "train.epochs=4")
    run_cli(*base, f"hydra.run.dir={scratch}", "train.epochs=5")
    proc = run_cli(*base, f"hydra.run.dir={branched}", "train.epochs=5",
                   f"train.branch_from={short / 'checkpoints' / 'epoch_3.pt'}")
    assert "branching from" in proc.stderr and "epoch 3/5" not in proc.stderr and "epoch 4/5" in proc.stderr
    want = torch.load(scratch / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
    got = torch.load(branched / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
    assert got["stage_key"] == want["stage_key"]  # the branched run is its from-scratch twin, key and all
    for name, value in want["model"].items():
        assert torch.allclose(got["model"][name], value, atol=1e-6), name
    # the loss rows of the borrowed epochs come along: the curve is whole
    assert (branched / "train_loss.csv").read_text() == (scratch / "train_loss.csv").read_text()
    assert len(list((branched / "sample_loss").glob("epoch_*.h5"))) == 5
    # a checkpoint inside the short run's decay is refused before any training, naming the step
    bad = run_cli(*base, f"hydra.run.dir={tmp_path / 'bad'}", "train.epochs=5",
                  f"train.branch_from={short / 'checkpoints' / 'epoch_4.pt'}", check=False)
    assert bad.returncode != 0 and "step 20 of its 24 ran at another learning rate" in bad.stderr
    assert "epoch 1/5" not in bad.stderr
    # so is another run: a different seed is a different world and initialisation
    other = run_cli(*base, f"hydra.run.dir={tmp_path / 'other'}", "train.epochs=5", "seed=1",
                    f"train.branch_from={short / 'checkpoints' / 'epoch_3.pt'}", check=False)
    assert other.returncode != 0 and "differs from this one in more than train.epochs" in other.stderr


def test_weight_average_resumes_and_is_the_model_later_stages_use(tmp_path):
    import torch

    from clipbd.models import factory

    run_dir = tmp_path / "ema"
    args = ["+experiment=smoke", f"hydra.run.dir={run_dir}", "stages=[data,poison,pretrain]", "train.epochs=2",
            "train.checkpoint_every=1", "train.ema_decay=0.9"]
    run_cli(*args)
    ckpt = run_dir / "checkpoints"
    full = torch.load(ckpt / "epoch_2.pt", map_location="cpu", weights_only=True)
    assert full["ema"]["decay"] == 0.9 and full["ema"]["steps"] > 0
    name = "visual.conv1.weight"
    assert not torch.equal(full["ema"]["weights"][name], full["model"][name])  # an average, not a copy
    # what extract, evaluate and model.checkpoint=... load: the average
    assert torch.equal(factory.read_checkpoint(ckpt / "latest.pt")["state_dict"][name], full["ema"]["weights"][name])
    # killed during epoch 2: the average resumes from epoch 1's and ends where the uninterrupted one did
    (run_dir / "stages" / "pretrain.json").unlink()
    (ckpt / "epoch_2.pt").unlink()
    shutil.copyfile(ckpt / "epoch_1.pt", ckpt / "latest.pt")
    assert "resuming from" in run_cli(*args).stderr
    resumed = torch.load(ckpt / "epoch_2.pt", map_location="cpu", weights_only=True)
    assert resumed["ema"]["steps"] == full["ema"]["steps"]
    for key, value in full["ema"]["weights"].items():
        assert torch.allclose(resumed["ema"]["weights"][key], value, atol=1e-6), key


def test_checkpoint_every_keeps_those_epochs_and_never_retrains(tmp_path):
    run_dir = tmp_path / "ckpt"
    run_cli("+experiment=smoke", f"hydra.run.dir={run_dir}", "stages=[data,poison,pretrain]", "train.epochs=3",
            "train.checkpoint_every=2")
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt"))
    assert kept == ["epoch_2.pt", "epoch_3.pt", "latest.pt"]  # every 2nd epoch and the last
    proc = run_cli("+experiment=smoke", f"hydra.run.dir={run_dir}", "stages=[data,poison,pretrain]", "train.epochs=3",
                   "train.checkpoint_every=0")
    assert "stage pretrain complete, skipped" in proc.stderr  # not part of the stage key
    bad = run_cli("+experiment=smoke", f"hydra.run.dir={tmp_path}/neg", "stages=[data,poison,pretrain]",
                  "train.checkpoint_every=-1", check=False)
    assert bad.returncode != 0 and "train.checkpoint_every=-1" in bad.stderr


def test_changed_detector_config_reruns_only_downstream(smoke_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(smoke_run[0], run_dir)
    proc = run_cli("+experiment=smoke", f"hydra.run.dir={run_dir}", "detector.dao.k=8", "stages=[data,poison,pretrain,extract,reduce]")
    # a detector setting re-scores the stored embeddings: extract (the encoding) is kept
    for stage in ["data", "poison", "pretrain", "extract"]:
        assert f"stage {stage:<8} complete, skipped" in proc.stderr
    assert "stage reduce   running" in proc.stderr


def test_force_extract_redoes_every_group_with_the_same_embeddings(smoke_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(smoke_run[0], run_dir)
    groups = sorted((run_dir / "shards").glob("extract-*.h5"))
    before = {g.name: (g.stat().st_mtime_ns, h5py.File(g)["image_emb"][()]) for g in groups}
    proc = run_cli("+experiment=smoke", f"hydra.run.dir={run_dir}", "stages=[extract]", "force=[extract]")
    assert "extract: 2 of 2 groups to do (0 of this task/rank already done, force=[extract])" in proc.stderr
    for g in groups:  # rewritten (what a timing of the stage measures), bit for bit the same
        mtime, emb = before[g.name]
        assert g.stat().st_mtime_ns != mtime
        assert np.array_equal(h5py.File(g)["image_emb"][()], emb)
    assert json.loads((run_dir / "timing.json").read_text())["time/extract_s"] > 0


def test_by_rank_reading_on_one_rank_trains_the_same_model(smoke_run, tmp_path):
    import torch

    run_dir = tmp_path / "by_rank"
    run_cli("+experiment=smoke", f"hydra.run.dir={run_dir}", "train.reading=by_rank", "stages=[data,poison,pretrain]")
    ref = torch.load(smoke_run[0] / "checkpoints" / "latest.pt", weights_only=True)["model"]
    got = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["model"]
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    proc = run_cli("+experiment=smoke", f"hydra.run.dir={run_dir}", "train.reading=sideways", "stages=[pretrain]",
                   check=False)
    assert proc.returncode != 0 and "train.reading=sideways: must be one of exact, by_rank" in proc.stderr


def test_reduce_names_missing_samples(smoke_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(smoke_run[0], run_dir)
    (run_dir / "shards" / "extract-00001.h5").unlink()
    proc = run_cli("+experiment=smoke", f"hydra.run.dir={run_dir}", "stages=[reduce]", "force=[reduce]", check=False)
    assert proc.returncode != 0
    assert "extract-00001.h5" in proc.stderr and "train-00002.tar" in proc.stderr


def test_scan_ranks_unlabelled_shards(smoke_run, tmp_path):
    ckpt = smoke_run[0] / "checkpoints" / "latest.pt"
    shards = smoke_run[0] / "data"
    run_dir = tmp_path / "scan"
    run_cli("+experiment=scan", f"dataset.shards={shards}/train-{{00000..00003}}.tar", f"model.checkpoint={ckpt}",
            "scoring.batch_size=100", f"hydra.run.dir={run_dir}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "AUROC" in metrics["detect/note"]
    with open(run_dir / "ranked.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 400 and "is_poison" not in rows[0]


def test_corrupt_tar_member_fails_in_one_line(smoke_run, tmp_path):
    src = smoke_run[0] / "data" / "train-00000.tar"
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad = bad_dir / "train-00000.tar"
    with tarfile.open(src) as tin, tarfile.open(bad, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name.endswith(".jpg") and m.name.startswith("000000003"):
                data = b"\xff\xd8\xff\xe0 this is not a jpeg"
                m.size = len(data)
            tout.addfile(m, io.BytesIO(data))
    ckpt = smoke_run[0] / "checkpoints" / "latest.pt"
    proc = run_cli("+experiment=scan", f"dataset.shards={bad}", f"model.checkpoint={ckpt}", "data.on_error=raise",
                   f"hydra.run.dir={tmp_path}/r", "scoring.batch_size=50", check=False)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("clipbd: error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert "000000003" in errors[0] and "train-00000.tar" in errors[0]


def test_scan_real_img2dataset_shards_as_is(smoke_run, tmp_path):
    """Shards written by the real img2dataset tool (incl. one with zero successes, plus its
    _stats.json/.parquet side files) are scanned without conversion: each success exactly once."""
    fixture = Path(__file__).parent / "data" / "img2dataset"
    expected = json.loads((fixture / "expected.json").read_text())["shards"]
    successes = {(r["key"], r["caption"]) for rows in expected.values() for r in rows if r["status"] == "success"}
    ckpt = smoke_run[0] / "checkpoints" / "latest.pt"
    run_dir = tmp_path / "scan"
    run_cli("+experiment=scan", f"dataset.shards={fixture}", f"model.checkpoint={ckpt}", f"hydra.run.dir={run_dir}",
            "scoring.batch_size=8", *[f"detector.{d}.k=3" for d in DETECTORS])
    with open(run_dir / "ranked.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(successes) == 8
    assert {(r["key"], r["caption"]) for r in rows} == successes
    assert sorted(int(r["index"]) for r in rows) == list(range(8))
