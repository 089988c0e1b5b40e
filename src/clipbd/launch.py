"""Submit clipbd runs to SLURM (or to local processes) through submitit, as a chain of dependent jobs:

    train    [data, poison, pretrain]   one job; its tasks are the DDP ranks
    extract  [extract]                  a job array: task i does the groups g with g % N == i
    reduce   [reduce, evaluate]         one job, once every extraction task has succeeded

Each job composes the config exactly as `python -m clipbd.run OVERRIDES` would and runs its stages
in the one run directory the chain fixed at submission. Stages whose outputs are complete are
skipped, so re-submitting a chain after a failure (a cancelled task, a node crash) only does what is
missing. Jobs are `submitit.helpers.Checkpointable`: on preemption or time-out SLURM requeues the
same call, and pretraining continues from `checkpoints/latest.pt`.
Resources come from the Hydra launcher configs (`conf/hydra/launcher/{slurm,local}.yaml`), with
per-phase overrides. The command-line face is `launchers/chain.py`; see docs/slurm.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
import yaml
from omegaconf import DictConfig, OmegaConf

PHASES = {"train": ("data", "poison", "pretrain"), "extract": ("extract",), "reduce": ("reduce", "evaluate")}
# Extraction and reduce are one process each (extraction scales by array tasks, not ranks).
SINGLE = {"nodes": 1, "tasks_per_node": 1}


def compose(overrides: list[str], *, hydra: bool = False) -> DictConfig:
    """The config `python -m clipbd.run OVERRIDES` runs (with the `hydra` node if asked)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from clipbd.cli import CONF_DIR, normalize_overrides

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=normalize_overrides(list(overrides)),
                             return_hydra_config=hydra)


class StageJob(submitit.helpers.Checkpointable):
    """One job: run `stages` of the run in `run_dir`, configured by `overrides` (CLI syntax).
    Checkpointable: a preempted or timed-out job is requeued with this same call."""

    def __init__(self, overrides: list[str], run_dir: str, stages: list[str]):
        self.overrides, self.run_dir, self.stages = list(overrides), str(run_dir), list(stages)

    def __call__(self) -> str:
        from clipbd import dist
        from clipbd.run import run

        cfg = compose(self.overrides + [f"run_dir={self.run_dir}", f"stages=[{','.join(self.stages)}]"])
        try:
            run(cfg, overrides=self.overrides)
        finally:
            dist.shutdown()
        return self.run_dir


@dataclass
class Launcher:
    """A launcher config (`conf/hydra/launcher/NAME.yaml`) turned into submitit executors."""

    cluster: str  # slurm | local
    params: dict[str, Any]
    folder: Path

    @classmethod
    def load(cls, name: str, overrides: list[str], folder: Path) -> "Launcher":
        """`overrides` are `key=value` for the launcher config (`hydra.launcher.` prefix optional)."""
        keys = [o if o.startswith("hydra.launcher.") else f"hydra.launcher.{o}" for o in overrides]
        hcfg = compose([f"hydra/launcher={name}", "hydra.job.name=clipbd", *keys], hydra=True).hydra
        params = OmegaConf.to_container(hcfg.launcher, resolve=False)
        target = params.pop("_target_")
        params.pop("submitit_folder", None)
        return cls("slurm" if target.endswith("SlurmLauncher") else "local", params, folder)

    def executor(self, name: str, **changes: Any) -> submitit.Executor:
        """An executor with this config's resources, `changes` applied (same keys as the config)."""
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

        params = {**self.params, **changes, "name": f"clipbd-{name}"}
        init = {"folder": str(self.folder / "%j")}
        if "max_num_timeout" in params:
            init[f"{self.cluster}_max_num_timeout"] = params.pop("max_num_timeout")
        ex = submitit.AutoExecutor(cluster=self.cluster, **init)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        ex.update_parameters(**{k if k in base else f"{self.cluster}_{k}": v for k, v in params.items()})
        return ex


@dataclass
class Chain:
    run_dir: Path
    jobs: dict[str, list[submitit.Job]] = field(default_factory=dict)

    def job_ids(self) -> dict[str, list[str]]:
        return {phase: [j.job_id for j in jobs] for phase, jobs in self.jobs.items()}

    def wait(self) -> None:
        """Block until every job ended; raise the first failure (submitit names the job and its log)."""
        for jobs in self.jobs.values():
            for j in jobs:
                j.result()


def submit_chain(overrides: list[str], run_dir: str | Path, *, launcher: str = "slurm",
                 launcher_overrides: list[str] = (), phase_overrides: dict[str, list[str]] | None = None,
                 extract_tasks: int = 4) -> Chain:
    """Submit the run's stages as train -> extract array (`extract_tasks`) -> reduce. On SLURM the
    later phases wait through `--dependency=afterok` (and are cancelled if a dependency fails); the
    local executor has no dependencies, so there each phase is awaited before the next is submitted.
    `phase_overrides[phase]`: launcher keys for that phase only (e.g. {"train": ["tasks_per_node=8"]})."""
    run_dir = Path(run_dir).resolve()
    cfg = compose(list(overrides) + [f"run_dir={run_dir}"])
    base = Launcher.load(launcher, list(launcher_overrides), run_dir / ".submitit")
    chain, after = Chain(run_dir), None
    for phase, stages in PHASES.items():
        todo = [s for s in stages if s in cfg.stages]
        if not todo:
            continue
        changes = {} if phase == "train" else dict(SINGLE)
        changes |= _kv(base, (phase_overrides or {}).get(phase, []))
        if after is not None and base.cluster == "slurm":
            extra = dict(base.params.get("additional_parameters") or {})
            changes["additional_parameters"] = extra | {"dependency": f"afterok:{after}", "kill-on-invalid-dep": "yes"}
        elif after is not None:
            chain.wait()
        ex = base.executor(phase, **changes)
        if phase == "extract":
            n = max(1, int(extract_tasks))
            with ex.batch():  # one SLURM job array
                jobs = [ex.submit(StageJob(list(overrides) + [f"extract.task={i}", f"extract.num_tasks={n}",
                                                              "logging.wandb.mode=disabled"], str(run_dir), todo))
                        for i in range(n)]
        else:
            jobs = [ex.submit(StageJob(list(overrides), str(run_dir), todo))]
        chain.jobs[phase] = jobs
        after = jobs[0].job_id.split("_")[0]  # an array's id: afterok waits for all of its tasks
    return chain


def _kv(base: Launcher, items: list[str]) -> dict[str, Any]:
    """`key=value` launcher overrides (YAML values) checked against the launcher config's keys."""
    out = {}
    for item in items:
        key, sep, value = item.removeprefix("hydra.launcher.").partition("=")
        if not sep or key not in base.params:
            raise ValueError(f"launcher override {item!r}: expected key=value with key one of "
                             f"{', '.join(sorted(base.params))}")
        out[key] = yaml.safe_load(value) if value else None
    return out


def default_run_dir(overrides: list[str]) -> Path:
    name = compose(list(overrides)).name
    return Path("outputs") / name / time.strftime("%Y-%m-%d_%H-%M-%S")
