"""Stage `evaluate`: zero-shot clean accuracy on the held-out split and the attack's success rate
(eval/clean_acc, attack/asr, attack/asr_incl_target, attack/bd_acc; per trigger for a multi-trigger
attack) into metrics.json. The evaluation itself, and what each metric means, is
clipbd.models.evaluation."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from clipbd import dist, rundir
from clipbd.data.sources import TEST_SPLIT, test_shards
from clipbd.models import factory
from clipbd.models.evaluation import evaluate_model
from clipbd.registry import build_attack
from clipbd.rundir import update_metrics

# model.*: the weights evaluated when the run did not pretrain (a given checkpoint, e.g. a scan)
DEPENDS = ("eval", "attack", "model.name", "model.arch", "model.checkpoint", *TEST_SPLIT,
           "dataset.classes", "dataset.prompts", "dataset.label_key", "seed")
UPSTREAM = ("data", "pretrain")
NEEDS_MODEL = True  # a trained model: this run's pretraining or model.checkpoint (checked first)
log = logging.getLogger("clipbd")


def main(cfg: DictConfig) -> dict[str, Path]:
    run_dir = Path(cfg.run_dir)
    out = {"metrics": rundir.metrics(cfg)}
    if not dist.is_main():
        return out
    shards = test_shards(cfg)
    if not shards:
        log.info("evaluate: no dataset.test_shards, nothing to evaluate")
        return out
    info = dist.info()
    bundle = factory.create_trained(cfg, device=info.device)
    metrics = evaluate_model(cfg, bundle, build_attack(cfg), info.device)
    update_metrics(run_dir, "eval/", {k: v for k, v in metrics.items() if k.startswith("eval/")})
    update_metrics(run_dir, "attack/", {k: v for k, v in metrics.items() if k.startswith("attack/")})
    return out
