"""The run's attack object, bound to its poison plan: what every stage that applies a trigger needs
(the stages, the report's thumbnails, trigger inversion's comparison with the real trigger)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from clipbd.registry import ConfigError, build
from clipbd.utils import read_json


def build_attack(cfg: DictConfig, bind: bool = True):
    """The configured attack object, or None (attack=none / attack=null: nothing is poisoned).
    With `bind` and a poison plan in the run dir, the attack takes the plan's trigger state (a
    WaNet field, an optimised patch, ...), so every stage applies the trigger the plan drew."""
    if not cfg.attack or cfg.attack.get("_target_") is None:
        return None
    attack = build(cfg.attack, "attack")
    path = Path(cfg.run_dir) / "poison_plan.json"
    if bind and hasattr(attack, "bind") and path.exists():
        plan = read_json(path)
        if plan.get("attack") != getattr(attack, "name", None):
            raise ConfigError(f"{path} was planned for attack {plan.get('attack')}, the config says "
                              f"{getattr(attack, 'name', None)}: re-run the poison stage (force=[poison])")
        attack.bind(plan, cfg.run_dir)
    return attack
