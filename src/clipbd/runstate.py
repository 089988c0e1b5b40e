"""Which stages of a run directory are complete, and whether they still match the config.

A finished stage leaves `<run_dir>/stages/<name>.json`: a key (hash of the config sections the stage
reads plus its upstream stages' keys), the outputs it produced, timing and the git revision. A stage
whose marker has the current key and whose outputs all exist is skipped; a changed config changes
the key, so that stage and everything downstream of it runs again.
"""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from clipbd import dist
from clipbd.config import STAGE_ORDER
from clipbd.utils import git_revision, read_json, stable_hash, write_json

log = logging.getLogger("clipbd")

# Config every stage may read without it entering a key: where the run lives, which stages run,
# logging and progress, the device (a run resumed on another machine keeps its outputs), the
# experiment's name (run-dir prefix, W&B group). tests/test_stage_keys.py checks the rest.
PLUMBING = ("run_dir", "stages", "force", "device", "logging", "name")


def stage_module(name: str) -> Any:
    if name not in STAGE_ORDER:
        raise ValueError(f"stages: unknown stage {name!r}; valid stages: {', '.join(STAGE_ORDER)}")
    return importlib.import_module(f"clipbd.stages.{name}")


def marker_path(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / "stages" / f"{name}.json"


def read_marker(run_dir: str | Path, name: str) -> dict | None:
    p = marker_path(run_dir, name)
    return read_json(p) if p.exists() else None


def _select(cfg: DictConfig, key: str) -> Any:
    node = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def stage_key(cfg: DictConfig, name: str) -> str:
    """Hash of what stage `name` reads: its config sections and its upstream stages' keys."""
    mod = stage_module(name)
    parts: dict[str, Any] = {k: _select(cfg, k) for k in mod.DEPENDS}
    for dotted in getattr(mod, "UNKEYED", ()):  # settings that do not change the outputs
        section, _, leaf = dotted.rpartition(".")
        if isinstance(parts.get(section), dict):
            parts[section].pop(leaf, None)
    for dotted in getattr(mod, "UNKEYED_IF_NULL", ()):  # a setting added later, at its null default,
        section, _, leaf = dotted.rpartition(".")          # keeps the keys of runs made before it
        if isinstance(parts.get(section), dict) and parts[section].get(leaf, 0) is None:
            parts[section].pop(leaf)
    ups = list(mod.UPSTREAM) + [up for up, when in getattr(mod, "UPSTREAM_IF", {}).items()
                                if _select(cfg, when) is not None]  # upstream only when configured
    for up in ups:
        marker = read_marker(cfg.run_dir, up)
        parts[f"stage:{up}"] = marker["key"] if marker else None
    return stable_hash(parts)


def is_complete(cfg: DictConfig, name: str) -> bool:
    marker = read_marker(cfg.run_dir, name)
    if marker is None or marker.get("key") != stage_key(cfg, name):
        return False
    return all(Path(p).exists() for p in marker.get("outputs", {}).values())


_EARLIER: dict[str, float] = {}  # stage -> seconds its interrupted attempts spent (this process)


def note_earlier_seconds(name: str, seconds: float) -> None:
    """A resumed stage reports the seconds its interrupted attempts spent on the work it keeps (e.g.
    the epochs in a checkpoint); the marker's `seconds` then counts them, so it stays the cost of
    the outputs, not of the last attempt."""
    _EARLIER[name] = float(seconds)


def stage_seconds(run_dir: str | Path, name: str) -> float | None:
    """What the stage's outputs cost (every attempt), from its marker; None if it never finished."""
    marker = read_marker(run_dir, name)
    return None if marker is None else marker.get("seconds")


def check_stages(cfg: DictConfig) -> None:
    """Run the `check(cfg)` of every selected stage that has one, before the first stage starts:
    a value that cannot work fails in seconds, not after pretraining."""
    for name in STAGE_ORDER:
        if name in cfg.stages:
            check = getattr(stage_module(name), "check", None)
            if check is not None:
                check(cfg)


def run_stage(cfg: DictConfig, name: str) -> dict[str, Path]:
    mod = stage_module(name)
    if name not in cfg.force and is_complete(cfg, name):
        log.info("stage %-8s complete, skipped (outputs match the config; force=[%s] re-runs it)", name, name)
        return {k: Path(v) for k, v in read_marker(cfg.run_dir, name)["outputs"].items()}
    log.info("stage %-8s running", name)
    _EARLIER.pop(name, None)  # a failed earlier call in this process must not count
    t0 = time.time()
    outputs = mod.main(cfg) or {}
    seconds = time.time() - t0 + _EARLIER.pop(name, 0.0)
    if dist.is_main():
        write_json(marker_path(cfg.run_dir, name), {
            "stage": name,
            "key": stage_key(cfg, name),
            "outputs": {k: str(v) for k, v in outputs.items()},
            "seconds": round(seconds, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "git": git_revision(),
        })
    dist.barrier()
    log.info("stage %-8s done in %.1f s", name, seconds)
    return outputs
