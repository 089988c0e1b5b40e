"""Building `_target_` plug-in nodes (attacks, detectors, prompt sources) in one place.

The config group is the registry: `conf/detector/dao.yaml` names its callable with `_target_`; this
module instantiates it and turns a wrong key into one line naming the node, the key and the valid
ones (Hydra's own message is a multi-line traceback).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from clipbd.errors import ConfigError

__all__ = ["ConfigError", "build", "check_node"]


def check_node(node: DictConfig | dict, where: str) -> None:
    """Raise ConfigError if `node`'s keys do not bind to its `_target_`'s signature."""
    d = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    target = d.pop("_target_", None)
    d.pop("_partial_", None)
    if target is None:
        raise ConfigError(f"{where}: missing `_target_`")
    try:
        fn = get_object(target)
    except Exception as e:  # noqa: BLE001 - hydra raises several types here
        raise ConfigError(f"{where}._target_={target}: cannot import it ({e})") from None
    sig = inspect.signature(fn)
    params = sig.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = [k for k in d if k not in params]
    if unknown:
        valid = ", ".join(k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} for {target}; valid keys: {valid}")


def build(node: DictConfig | dict, where: str, **kwargs: Any) -> Any:
    check_node(node, where)
    return instantiate(node, **kwargs)


def build_attack(cfg: DictConfig, bind: bool = True) -> Any:
    """The configured attack object, or None (attack=none / attack=null: nothing is poisoned).
    With `bind` and a poison plan in the run dir, the attack takes the plan's trigger state (a
    WaNet field, an optimised patch, ...), so every stage applies the trigger the plan drew."""
    from clipbd import rundir
    from clipbd.utils import read_json

    if not cfg.attack or cfg.attack.get("_target_") is None:
        return None
    attack = build(cfg.attack, "attack")
    path = rundir.poison_plan(cfg)
    if bind and hasattr(attack, "bind") and path.exists():
        plan = read_json(path)
        if plan.get("attack") != getattr(attack, "name", None):
            raise ConfigError(f"{path} was planned for attack {plan.get('attack')}, the config says "
                              f"{getattr(attack, 'name', None)}: re-run the poison stage (force=[poison])")
        attack.bind(plan, cfg.run_dir)
    return attack


def build_detectors(cfg: DictConfig) -> dict[str, Any]:
    """name -> detector object for every `detector.<name>` node (conf/detector/)."""
    if not cfg.detector:
        raise ConfigError("detector: no detector selected (e.g. detector=[dao,slof,kdist,lid])")
    return {name: build(node, f"detector.{name}") for name, node in cfg.detector.items()}
