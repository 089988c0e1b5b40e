"""Shared fixtures: compose configs like the CLI does, and run the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from clipbd.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
register_configs()


def compose_cfg(overrides: list[str] = (), run_dir: Path | None = None) -> DictConfig:
    """The config `python -m clipbd.run OVERRIDES` would run, with run_dir set (no Hydra app)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    if run_dir is not None:
        OmegaConf.update(cfg, "run_dir", str(run_dir))
    return cfg


def run_cli(*args: str, cwd: Path | None = None, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "clipbd.run", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"clipbd.run {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One tiny end-to-end run of every stage, shared by the tests that inspect its artifacts."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    proc = run_cli("+experiment=smoke", f"hydra.run.dir={run_dir}")
    return run_dir, proc


@pytest.fixture(scope="session")
def _tiny_base() -> DictConfig:
    """The smoke experiment, composed once per session, forced to CPU and one process."""
    cfg = compose_cfg(["+experiment=smoke", "device=cpu", "logging.wandb.mode=disabled", "logging.progress=never"])
    OmegaConf.set_readonly(cfg, True)
    return cfg


@pytest.fixture
def tiny_cfg(_tiny_base, tmp_path) -> DictConfig:
    """A fresh, writable copy of the composed tiny config with its run directory in tmp_path."""
    cfg = OmegaConf.create(OmegaConf.to_container(_tiny_base))
    OmegaConf.set_struct(cfg, True)
    OmegaConf.update(cfg, "run_dir", str(tmp_path / "run"))
    return cfg
