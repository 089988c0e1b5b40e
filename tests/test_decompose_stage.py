"""The `decompose` stage on the smoke run (both entry points), and `train.init_checkpoint`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import compose_cfg, run_cli
from omegaconf import OmegaConf

from clipbd.runstate import stage_key


@pytest.mark.slow
def test_decompose_stage_on_a_finished_run_and_on_a_checkpoint(smoke_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run[0], run_dir)
    before = json.loads((run_dir / "metrics.json").read_text())
    run_cli(f"hydra.run.dir={run_dir}", "+experiment=smoke", "stages=[decompose]")
    for rel in ("decompose/report.json", "plots/heads_infected.png", "plots/ablation.png"):
        assert (run_dir / rel).is_file(), rel
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {k: v for k, v in metrics.items() if not k.startswith("inspect/")} == before
    decomp = {k: v for k, v in metrics.items() if k.startswith("inspect/decomp/")}
    for key in ("baseline/asr", "baseline/clean_acc", "rep/published/asr", "det/count/auroc",
                "det/continuous/auroc", "mlp_repair/asr", "ablate/layer/accumulated/0/asr"):
        assert f"inspect/decomp/{key}" in decomp, key
    report = json.loads((run_dir / "decompose/report.json").read_text())["triggers"]["badnets"]
    assert report["images"] == {"validation": 40, "test": 160}  # 20% of the 200 held-out images
    assert report["shape"] == {"layers": 1, "heads": 2, "dim": 64}
    # a re-run with the same config is skipped; the same checkpoint and shards through the
    # experiment entry point (no run of its own) give the same numbers
    proc = run_cli(f"hydra.run.dir={run_dir}", "+experiment=smoke", "stages=[decompose]")
    assert "decompose complete, skipped" in proc.stderr
    other = tmp_path / "ckpt"
    run_cli("+experiment=decompose", f"model.checkpoint={run_dir}/checkpoints/latest.pt",
            f"dataset.test_shards={smoke_run[0]}/data/test-{{00000..00001}}.tar", f"hydra.run.dir={other}",
            "eval.prompts_per_class=8")
    again = json.loads((other / "metrics.json").read_text())
    assert again == decomp


@pytest.mark.slow
def test_decompose_without_a_trigger_fails_in_one_line(smoke_run, tmp_path):
    proc = run_cli("+experiment=decompose", "attack=none", f"model.checkpoint={smoke_run[0]}/checkpoints/latest.pt",
                   f"dataset.test_shards={smoke_run[0]}/data/test-{{00000..00001}}.tar",
                   f"hydra.run.dir={tmp_path / 'x'}", check=False)
    assert proc.returncode == 2 and "clipbd: error: decompose: attack=none" in proc.stderr


@pytest.mark.slow
def test_init_checkpoint_starts_from_those_weights(smoke_run, tmp_path):
    ckpt = smoke_run[0] / "checkpoints" / "latest.pt"
    run_dir = tmp_path / "ft"
    run_cli("+experiment=smoke", f"hydra.run.dir={run_dir}", "stages=[data,poison,pretrain]",
            f"train.init_checkpoint={ckpt}", "train.lr=0")  # lr 0: the weights must stay the start's
    start = torch.load(ckpt, weights_only=True)["model"]
    end = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["model"]
    assert all(torch.equal(start[k], end[k]) for k in start)


def test_init_checkpoint_is_keyed_and_null_keeps_earlier_keys(tmp_path):
    cfg = compose_cfg(run_dir=tmp_path)
    key = stage_key(cfg, "pretrain")
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))  # untyped, so a key can be removed
    del cfg.train["init_checkpoint"]  # a config from before the setting existed
    assert stage_key(cfg, "pretrain") == key
    cfg.train.init_checkpoint = "clean/latest.pt"
    assert stage_key(cfg, "pretrain") != key
