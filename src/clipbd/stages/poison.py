"""Stage `poison`: write `poison_plan.json` — which samples are poisoned, their trigger parameters and
target captions — deterministically from `seed`. No attack configured: an empty plan (scan, clean runs).
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

from hydra.utils import get_object
from omegaconf import DictConfig

from clipbd import dist, rundir
from clipbd.attacks.context import PlanContext
from clipbd.data.sources import class_names, load_index, prompt_fn
from clipbd.errors import ConfigError
from clipbd.registry import build_attack
from clipbd.utils import rng, write_json

# the attack, the seed, and the prompts and classes its target captions are drawn from (always read:
# the caption pool when attack.target_captions is null, the target-class check otherwise); plus the
# config an attack's plan reads through its PlanContext, declared by the attack class (`plan_reads`:
# targeted poisoning reads the test split, BadCLIP trains a surrogate)
DEPENDS = ("attack", "seed", "dataset.prompts", "dataset.classes")
UPSTREAM = ("data",)
# The same plan drawn again (e.g. after a change of dataset.prompts with fixed target captions): the
# pretrained model stays.
EARLY_CUTOFF = True
log = logging.getLogger("clipbd")


def depends(cfg: DictConfig) -> tuple[str, ...]:
    target = cfg.attack.get("_target_") if cfg.attack else None
    return DEPENDS + (tuple(getattr(get_object(target), "plan_reads", ())) if target else ())


def main(cfg: DictConfig) -> dict[str, Path]:
    path = rundir.poison_plan(cfg)
    out = {"plan": path}
    if dist.is_main():
        index = load_index(cfg)
        n = len(index)
        attack = build_attack(cfg, bind=False)
        if attack is None:
            plan = {"attack": None, "num_samples": n, "poison_rate": 0.0, "poison_count": 0, "poison_indices": []}
        else:
            target = attack.target_class
            if target not in class_names(cfg):
                raise ConfigError(f"attack.target_class={target}: not one of the dataset's classes "
                                  f"({', '.join(class_names(cfg)[:10])}, ...)")
            pool = prompt_fn(cfg)(target, n=256, seed=cfg.seed)
            ctx = PlanContext.for_run(cfg, index)
            if "ctx" in inspect.signature(attack.plan).parameters:
                plan = attack.plan(n, rng(cfg.seed, "poison"), pool, ctx=ctx)
            else:  # a user attack class with the minimal plan(num_samples, rng, caption_pool)
                plan = attack.plan(n, rng(cfg.seed, "poison"), pool)
            plan["seed"] = int(cfg.seed)
        write_json(path, plan)
        if (rundir.run_dir(cfg) / "attack").is_dir():
            out["attack"] = rundir.run_dir(cfg) / "attack"  # files the plan names (patches, images)
        if plan["attack"] is None:
            log.info("poison plan: no attack configured, none of the %d samples poisoned", n)
        else:
            log.info("poison plan: %d of %d samples poisoned (%s)", plan["poison_count"], n, plan["attack"])
    dist.barrier()
    return out
