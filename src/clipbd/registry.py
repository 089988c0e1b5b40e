"""Building `_target_` plug-in nodes (attacks, detectors, prompt sources) in one place.

The config group is the registry: `conf/detector/dao.yaml` names its callable with `_target_`; this
module instantiates it and turns a wrong key into one line naming the node, the key and the valid
ones (Hydra's own message is a multi-line traceback).

A config is data: a `_target_` may name only a callable of clipbd's plug-in modules (PLUGIN_MODULES)
or of a module the user trusts by listing it in `plugins.allow` (`plugins.allow=[mypkg]`).
`check_targets` walks the whole composed config before anything is built or called (the command
line's composition check and the start of every run), and refuses any other target in one line: so
`_target_: torch.load`, `builtins.eval` or `subprocess.run` never runs. The object a target resolves
to must itself belong to an allowed module (`clipbd.attacks.badnets.np.load` is numpy's, refused).
Dotted callables a plug-in takes as a value (PluginTrigger's `generator`) are checked the same way:
the class names them in `CALLABLE_KEYS`.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from clipbd.errors import ClipbdError, ConfigError

__all__ = ["ConfigError", "PLUGIN_MODULES", "build", "check_node", "check_targets"]

# clipbd's own plug-in modules: what its config groups name (conf/attack, detector, scoring, dataset)
PLUGIN_MODULES = ("clipbd.attacks", "clipbd.detectors", "clipbd.scoring", "clipbd.data.sources",
                  "clipbd.models.zeroshot")


def _under(name: str, modules) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def check_target(target: Any, where: str, allow=()) -> None:
    """Raise ConfigError unless `target` names a callable of an allowed module; never imports a
    module outside the allow-list, never calls anything."""
    modules = PLUGIN_MODULES + tuple(allow)
    fix = ("a config may name only clipbd's plug-ins (" + ", ".join(PLUGIN_MODULES) + ") and modules listed "
           "in plugins.allow")
    if not isinstance(target, str) or not _under(target, modules):
        top = str(target).split(".")[0]
        raise ConfigError(f"{where}={target}: not an allowed plug-in; {fix} (to trust {top}, add "
                          f"plugins.allow=[{top}])")
    try:
        obj = get_object(target)
    except Exception as e:  # noqa: BLE001 - hydra raises several types here
        raise ConfigError(f"{where}={target}: cannot import it ({e})") from None
    owner = getattr(obj, "__module__", None) or ""
    if not _under(owner, modules):
        raise ConfigError(f"{where}={target}: resolves to {owner or type(obj).__name__}."
                          f"{getattr(obj, '__qualname__', '')}, outside the allowed modules; {fix}")


def check_targets(cfg: DictConfig) -> None:
    """Every `_target_` in the composed config (and every dotted callable a plug-in class takes,
    its CALLABLE_KEYS) names an allowed callable (module docstring). Reads `plugins.allow`."""
    allow = tuple(OmegaConf.select(cfg, "plugins.allow", default=None) or ())
    bad = [m for m in allow if not isinstance(m, str) or not m or m.startswith(".")]
    if bad:
        raise ConfigError(f"plugins.allow={list(allow)}: entries must be module names (e.g. plugins.allow=[mypkg])")

    def walk(node: Any, path: str) -> None:
        if isinstance(node, (DictConfig, ListConfig)) and (node._is_none() or node._is_missing()):
            return
        if isinstance(node, DictConfig):
            if "_target_" in node:
                target = node._get_node("_target_")._value()  # unresolved: an interpolation is refused
                where = f"{path}._target_" if path else "_target_"
                if target is not None:
                    check_target(target, where, allow)
                    for key in getattr(get_object(target), "CALLABLE_KEYS", ()):
                        value = node.get(key)
                        if value is not None:
                            check_target(value, f"{path}.{key}", allow)
            for k in node:
                if k != "_target_":
                    walk(node._get_node(k), f"{path}.{k}" if path else str(k))
        elif isinstance(node, ListConfig):
            for i in range(len(node)):
                walk(node._get_node(i), f"{path}[{i}]")

    walk(cfg, "")


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
    """Instantiate `node`; a value its callable rejects (ValueError, TypeError) becomes one
    ConfigError naming the node (`detector.dao: k=0: must be >= 1`)."""
    check_node(node, where)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ClipbdError):
            raise cause from None
        if isinstance(cause, (ValueError, TypeError, FileNotFoundError)):
            msg = str(cause)
            raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None
        raise


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
