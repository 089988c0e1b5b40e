"""`python -m clipbd.run [+experiment=NAME] [key=value ...]`: compose the config, then run the stages.

With no arguments it runs the embedded default experiment (synthetic data, tiny CLIP, BadNets at
5% with an 8-px patch, in-batch DAO/SLOF/k-distance/LID). `hydra.run.dir=DIR` picks the run directory; re-running the
same directory skips stages whose outputs are complete; `stages=[extract,reduce]` runs a subset.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from clipbd import dist, tracking
from clipbd.cli import CONF_DIR, check_command_line, die, normalize_overrides
from clipbd.config import STAGE_ORDER, register_configs
from clipbd.errors import ClipbdError, ConfigError
from clipbd.utils import (atomic_path, git_revision, machine, process_age, read_json, set_progress_mode,
                          write_json)

log = logging.getLogger("clipbd")
register_configs()


def _setup_logging(cfg: DictConfig, run_dir: Path) -> None:
    level = getattr(logging, str(cfg.logging.level).upper(), logging.INFO)
    log.setLevel(level)
    log.disabled = False  # Hydra's logging config may have disabled loggers created at import
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
    fmt = logging.Formatter("[%(asctime)s clipbd] %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    log.addHandler(stream)
    if dist.is_main():
        file = logging.FileHandler(run_dir / "run.log")
        file.setFormatter(fmt)
        log.addHandler(file)
    set_progress_mode(cfg.logging.progress)


def run(cfg: DictConfig, overrides: list[str] | None = None) -> Path:
    """Run the selected stages in order in `cfg.run_dir`; returns the run directory.
    `overrides` (the command line's) are recorded in meta.json so that later messages can say how to
    re-run a part of this run.

    The attempt's record (resolved config, git revision, argv) is written to
    `attempts/<started>-<pid>/{config.yaml,meta.json}` and promoted to the run's `config.yaml` and
    `meta.json` only when every stage succeeded: a failed attempt leaves the record of the last
    completed run intact, with its own record and error beside it (docs/architecture.md)."""
    info = dist.init(cfg.device)
    own_dir = Path(cfg.run_dir).resolve()
    # One run directory for all ranks: each rank resolved `${now:}` itself, rank 0's choice wins.
    run_dir = Path(dist.broadcast_object(str(own_dir)))
    OmegaConf.update(cfg, "run_dir", str(run_dir), merge=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    if own_dir != run_dir:
        _remove_stray_dir(own_dir)
    _setup_logging(cfg, run_dir)
    attempt = None
    try:
        unknown = [s for s in cfg.stages if s not in STAGE_ORDER]
        if unknown:
            raise ConfigError(f"stages: unknown stage(s) {unknown}; valid: {list(STAGE_ORDER)}")
        from clipbd import runstate  # imported late: stage modules import torch/open_clip

        runstate.check_stages(cfg)  # every check whose inputs the config alone holds, before any work
        if dist.is_main():
            attempt = _write_attempt(cfg, run_dir, overrides, info.world)
        log.info("run dir %s (device %s, world %d)", run_dir, info.device, info.world)
        selected = [name for name in STAGE_ORDER if name in cfg.stages]
        todo = [n for n in selected if n in cfg.force or not runstate.is_complete(cfg, n)]
        # Offline W&B makes a new offline-run-* directory per start even when resuming the run's id:
        # a re-run with nothing to do logs nothing and does not start it.
        with tracking.start(cfg) if todo else contextlib.nullcontext():
            _note_startup(attempt)
            timings = {}
            for name in selected:
                runstate.run_stage(cfg, name)
                # the marker's seconds: what the outputs cost, also when this invocation skipped
                # the stage or resumed it (not the seconds a skip took)
                seconds = runstate.stage_seconds(run_dir, name)
                if seconds is not None:
                    timings[f"time/{name}_s"] = round(seconds, 2)
            tracking.log_run_results(cfg, timings)
        if not todo:
            log.info("every selected stage was complete: nothing run (force=[NAME] re-runs one)")
    except BaseException as e:
        _record_failure(run_dir, attempt, e)
        raise
    if attempt is not None:
        _promote(attempt, run_dir)
    return run_dir


def _note_startup(attempt: Path | None) -> None:
    """Seconds from the process's start to its first stage (interpreter, imports, composition, the
    config checks; W&B starts in the background alongside the first stage): logged, and kept in
    meta.json as `startup_s`."""
    startup = process_age()
    log.info("start-up %.1f s (imports, composition, checks) before the first stage", startup)
    if attempt is not None:
        write_json(attempt / "meta.json", read_json(attempt / "meta.json") | {"startup_s": round(startup, 2)})


def _write_attempt(cfg: DictConfig, run_dir: Path, overrides: list[str] | None, world: int) -> Path:
    now = time.localtime()
    attempt = run_dir / "attempts" / f"{time.strftime('%Y-%m-%dT%H-%M-%S', now)}-{os.getpid()}"
    attempt.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, attempt / "config.yaml", resolve=True)
    write_json(attempt / "meta.json", {"git": git_revision(), "argv": sys.argv, "overrides": overrides,
                                       "started": time.strftime("%Y-%m-%dT%H:%M:%S", now), "world": world,
                                       **machine()})
    return attempt


def _promote(attempt: Path, run_dir: Path) -> None:
    """The succeeded attempt's record becomes the run's (each file atomically; concurrent array
    tasks sharing the directory each promote their own)."""
    meta = read_json(attempt / "meta.json") | {"finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with atomic_path(run_dir / "config.yaml") as tmp:
        shutil.copyfile(attempt / "config.yaml", tmp)
    write_json(run_dir / "meta.json", meta)
    shutil.rmtree(attempt, ignore_errors=True)
    with contextlib.suppress(OSError):
        (run_dir / "attempts").rmdir()  # only if no failed attempt is kept there


def _record_failure(run_dir: Path, attempt: Path | None, e: BaseException) -> None:
    """The error into run.log and the attempt's meta.json (the run's own record is left alone)."""
    if isinstance(e, SystemExit) and not e.code:
        return
    users = isinstance(e, (ClipbdError, FileNotFoundError))
    msg = str(e) if users else f"{type(e).__name__}: {e}"
    # to run.log only: stderr gets the one line from die() (or the traceback of a bug)
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "clipbd: error: %s" if users else "run stopped: %s",
                            (msg,), sys.exc_info() if not users and isinstance(e, Exception) else None)
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    if attempt is not None and (attempt / "meta.json").exists():
        write_json(attempt / "meta.json", read_json(attempt / "meta.json")
                   | {"failed": time.strftime("%Y-%m-%dT%H:%M:%S"), "error": msg})


def _remove_stray_dir(path: Path) -> None:
    """A non-zero rank's own Hydra output dir (a different `${now:}`), if it holds only `.hydra`."""
    if path.is_dir() and {p.name for p in path.iterdir()} <= {".hydra"}:
        shutil.rmtree(path, ignore_errors=True)


def _sweep_defaults(cfg: DictConfig, hc) -> None:
    """In a multirun (`-m`), the jobs of one sweep share a W&B group (`<name>-<sweep dir name>`) and
    are tagged with their own overrides (`detector=dao`, `attack.poison_rate=0.01`) to filter by."""
    from hydra.types import RunMode

    if hc.mode != RunMode.MULTIRUN:
        return
    if cfg.logging.wandb.group is None:
        OmegaConf.update(cfg, "logging.wandb.group", f"{cfg.name}-{Path(hc.sweep.dir).name}")
    tags = list(cfg.logging.wandb.tags) + [o for o in hc.overrides.task if len(o) <= 64]
    OmegaConf.update(cfg, "logging.wandb.tags", list(dict.fromkeys(tags)), merge=False)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    try:
        _sweep_defaults(cfg, hc)
        run(cfg, overrides=list(hc.overrides.task))
    except (ClipbdError, FileNotFoundError) as e:  # the user's to fix: one line, exit 2 (also in run.log)
        die(str(e))
    finally:
        dist.shutdown()


def cli() -> None:
    sys.argv[1:] = normalize_overrides(sys.argv[1:])
    check_command_line(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    cli()
