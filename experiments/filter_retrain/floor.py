"""The floor a filter-and-retrain can reach: a poisoned run's trigger applied to a clean run's model.

    python experiments/filter_retrain/floor.py CLEAN_RUN POISONED_RUN

CLEAN_RUN: a finished `attack=none` run; POISONED_RUN: a run whose `attack` config gives the trigger
(its poison plan is not used: BadNets' `patch_location: random` draws its positions from the seed).
Prints the clean model's zero-shot clean accuracy and how often it sends triggered non-target test
images to the target class (attack/asr): with no poison at all, this is the ASR no filtering can go
below in this world (the rare target class is a hub of the small models).
"""

from __future__ import annotations

import argparse
import json

import torch
from omegaconf import OmegaConf

from clipbd.config import register_configs
from clipbd.models import factory
from clipbd.models.evaluation import evaluate_model
from clipbd.registry import build_attack


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("clean_run")
    ap.add_argument("poisoned_run")
    args = ap.parse_args()
    register_configs()
    torch.set_num_threads(1)
    cfg = OmegaConf.load(f"{args.clean_run}/config.yaml")
    OmegaConf.update(cfg, "run_dir", args.clean_run, force_add=True)
    cfg.attack = OmegaConf.load(f"{args.poisoned_run}/config.yaml").attack
    bundle = factory.create_trained(cfg, device="cpu")
    metrics = evaluate_model(cfg, bundle, build_attack(cfg, bind=False), "cpu")
    print(json.dumps({"clean_run": args.clean_run, "trigger_of": args.poisoned_run,
                      **{k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}}))


if __name__ == "__main__":
    main()
