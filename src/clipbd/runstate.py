"""Which stages of a run directory are complete, and whether they still match the config.

A finished stage leaves `<run_dir>/stages/<name>.json`: a key (hash of the config keys the stage
reads — `DEPENDS`, or `depends(cfg)` where what it reads depends on the config — plus its upstream
stages' ids), the outputs it produced, timing and the git revision. A stage whose marker has the
current key and whose outputs all exist is skipped; a changed config changes the key, so that stage
runs again.

Early cutoff (as in build systems): a stage that declares `EARLY_CUTOFF = True` (cheap outputs: data,
poison) records an `identity` of its outputs (`identity(outputs)`, else a digest of the files). When it
re-runs and its outputs are what they were, its marker keeps its previous `id`, and that id — not the
new key — is what downstream keys hash: a re-indexed dataset or a re-drawn poison plan that came out
the same never retrains. Markers written before ids existed count their key as their id.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from clipbd import dist
from clipbd.config import STAGE_ORDER
from clipbd.utils import git_revision, machine, read_json, stable_hash, write_json

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
    """The value at `key` as plain data (dicts and lists of any depth: a list-valued key such as
    `dataset.test_shards=[a.tar,b.tar]` hashes like any other)."""
    node = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def depends(mod: Any, cfg: DictConfig) -> tuple[str, ...]:
    """The config keys stage module `mod` reads for this config: `depends(cfg)` if the stage has one
    (what it reads depends on the config, e.g. only the detectors that need images), else DEPENDS."""
    fn = getattr(mod, "depends", None)
    return tuple(fn(cfg)) if fn is not None else tuple(mod.DEPENDS)


def _drop(parts: dict[str, Any], dotted: str) -> None:
    """Remove the setting `dotted` (UNKEYED) from whichever hashed section holds it."""
    for section, value in parts.items():
        if dotted.startswith(section + "."):
            *path, leaf = dotted[len(section) + 1:].split(".")
            for p in path:
                value = value.get(p) if isinstance(value, dict) else None
            if isinstance(value, dict):
                value.pop(leaf, None)


def marker_id(marker: dict | None) -> str | None:
    """What downstream keys hash for an upstream stage (its key unless early cutoff kept an older id)."""
    return None if marker is None else marker.get("id", marker["key"])


def stage_key(cfg: DictConfig, name: str) -> str:
    """Hash of what stage `name` reads: its config keys and its upstream stages' ids."""
    mod = stage_module(name)
    parts: dict[str, Any] = {k: _select(cfg, k) for k in depends(mod, cfg)}
    for dotted in getattr(mod, "UNKEYED", ()):  # settings that do not change the outputs
        _drop(parts, dotted)
    for dotted in getattr(mod, "UNKEYED_IF_NULL", ()):  # a setting added later, at its null default,
        section, _, leaf = dotted.rpartition(".")          # keeps the keys of runs made before it
        if isinstance(parts.get(section), dict) and parts[section].get(leaf, 0) is None:
            parts[section].pop(leaf)
    for dotted, default in getattr(mod, "UNKEYED_IF", {}).items():  # likewise, at another default
        section, _, leaf = dotted.rpartition(".")
        if isinstance(parts.get(section), dict) and parts[section].get(leaf, object()) == default:
            parts[section].pop(leaf)
    ups = list(mod.UPSTREAM) + [up for up, when in getattr(mod, "UPSTREAM_IF", {}).items()
                                if _select(cfg, when) is not None]  # upstream only when configured
    for up in ups:
        parts[f"stage:{up}"] = marker_id(read_marker(cfg.run_dir, up))
    return stable_hash(parts)


def digest_paths(paths) -> str:
    """sha256 (16 hex) of the bytes of every file under `paths` (files or directories), by name."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file():
                h.update(f"{f.relative_to(p.parent)}\0".encode())
                with open(f, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
    return h.hexdigest()[:16]


def output_identity(mod: Any, outputs: dict) -> str | None:
    """The identity of a stage's outputs (EARLY_CUTOFF stages), None if they are not all there."""
    if not getattr(mod, "EARLY_CUTOFF", False) or not outputs:
        return None
    paths = {k: Path(v) for k, v in outputs.items()}
    if not all(p.exists() for p in paths.values()):
        return None
    fn = getattr(mod, "identity", None)
    ident = fn(paths) if fn is not None else digest_paths(paths.values())
    scheme = getattr(mod, "IDENTITY_SCHEME", None)  # what the identity covers, when it changed once
    return f"{scheme}:{ident}" if scheme else ident


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
    """Before the first stage starts: every `_target_` is allow-listed (before anything is built),
    the config's values and plug-ins are valid (clipbd.checks), a trained model exists for the
    stages that need one (NEEDS_MODEL), and the `check(cfg)` of every selected stage that has one
    passes: a value that cannot work fails in seconds, not after pretraining."""
    from clipbd import checks
    from clipbd.registry import check_targets

    check_targets(cfg)
    checks.check_values(cfg)
    checks.check_plugins(cfg)
    checks.check_inputs(cfg)
    selected = [name for name in STAGE_ORDER if name in cfg.stages]
    checks.check_checkpoint(cfg, [n for n in selected if getattr(stage_module(n), "NEEDS_MODEL", False)])
    for name in selected:
        check = getattr(stage_module(name), "check", None)
        if check is not None:
            check(cfg)


def _previous_identity(mod: Any, prev: dict | None) -> str | None:
    """The identity of the outputs an earlier run of the stage left: recorded, or computed from the
    files (still the earlier run's: this is called before the stage runs again) for a marker written
    before identities were recorded or by another scheme (a stage's IDENTITY_SCHEME)."""
    if prev is None:
        return None
    recorded, scheme = prev.get("identity"), getattr(mod, "IDENTITY_SCHEME", None)
    if recorded and (scheme is None or recorded.startswith(f"{scheme}:")):
        return recorded
    return output_identity(mod, prev.get("outputs", {})) or recorded


def run_stage(cfg: DictConfig, name: str) -> dict[str, Path]:
    mod = stage_module(name)
    if name not in cfg.force and is_complete(cfg, name):
        log.info("stage %-8s complete, skipped (outputs match the config; force=[%s] re-runs it)", name, name)
        return {k: Path(v) for k, v in read_marker(cfg.run_dir, name)["outputs"].items()}
    log.info("stage %-8s running", name)
    _EARLIER.pop(name, None)  # a failed earlier call in this process must not count
    prev = read_marker(cfg.run_dir, name)
    before = _previous_identity(mod, prev) if dist.is_main() else None
    t0 = time.time()
    outputs = mod.main(cfg) or {}
    seconds = time.time() - t0 + _EARLIER.pop(name, 0.0)
    if dist.is_main():
        key, identity = stage_key(cfg, name), output_identity(mod, outputs)
        same = before is not None and before == identity
        if same and marker_id(prev) != key:
            log.info("stage %-8s outputs unchanged: downstream stages keep their results", name)
        write_json(marker_path(cfg.run_dir, name), {
            "stage": name,
            "key": key,
            "id": marker_id(prev) if same else key,
            "identity": identity,
            "outputs": {k: str(v) for k, v in outputs.items()},
            "seconds": round(seconds, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "git": git_revision(),
            # what made these outputs (meta.json says what ran last): CPU kind, torch threads, world
            "machine": machine() | {"world": dist.info().world},
        })
    dist.barrier()
    log.info("stage %-8s done in %.1f s", name, seconds)
    return outputs
