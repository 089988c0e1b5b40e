"""Stage `poison`: write `poison_plan.json` — which samples are poisoned, their trigger parameters and
target captions — deterministically from `seed`. No attack configured: an empty plan (scan, clean runs).
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from clipbd import dist
from clipbd.data.sources import class_names, load_index, prompt_fn
from clipbd.registry import ConfigError, build
from clipbd.utils import rng, write_json

DEPENDS = ("attack", "seed", "dataset.prompts", "dataset.classes")
UPSTREAM = ("data",)
log = logging.getLogger("clipbd")


def build_attack(cfg: DictConfig):
    """The configured attack object, or None (attack=none / attack=null: nothing is poisoned)."""
    if not cfg.attack or cfg.attack.get("_target_") is None:
        return None
    return build(cfg.attack, "attack")


def main(cfg: DictConfig) -> dict[str, Path]:
    path = Path(cfg.run_dir) / "poison_plan.json"
    if dist.is_main():
        n = len(load_index(cfg))
        attack = build_attack(cfg)
        if attack is None:
            plan = {"attack": None, "num_samples": n, "poison_rate": 0.0, "poison_count": 0, "poison_indices": []}
        else:
            target = attack.target_class
            if target not in class_names(cfg):
                raise ConfigError(f"attack.target_class={target}: not one of the dataset's classes "
                                  f"({', '.join(class_names(cfg)[:10])}, ...)")
            pool = prompt_fn(cfg)(target, n=256, seed=cfg.seed)
            plan = attack.plan(n, rng(cfg.seed, "poison"), pool)
            plan["seed"] = int(cfg.seed)
        write_json(path, plan)
        log.info("poison plan: %d of %d samples poisoned (%s)", plan["poison_count"], n, plan["attack"])
    dist.barrier()
    return {"plan": path}
