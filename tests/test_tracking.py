"""W&B tracking (issue 17): wandb.init runs in a background thread so the first stage does not wait
for it; what is logged reaches the offline run, and an init failure surfaces in the main thread at
the first use instead of vanishing with the thread."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from clipbd import tracking


def test_wandb_starts_in_the_background_and_keeps_what_is_logged(tiny_cfg):
    OmegaConf.update(tiny_cfg, "logging.wandb.mode", "offline")
    run_dir = Path(tiny_cfg.run_dir)
    run_dir.mkdir(parents=True)
    with tracking.start(tiny_cfg) as starting:
        assert isinstance(starting, tracking._Starting)  # start() returned before wandb.init finished
        tracking.log({"probe/value": 1.25}, step=0)     # the first use waits for it
        assert tracking._run() is not None and not isinstance(tracking._RUN, tracking._Starting)
    assert tracking._RUN is None
    logs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1 and b"probe/value" in logs[0].read_bytes()


def test_an_init_failure_is_raised_in_the_main_thread(tiny_cfg, monkeypatch):
    import wandb

    def refuse(**kwargs):
        raise RuntimeError("W&B refused: no API key")

    monkeypatch.setattr(wandb, "init", refuse)
    OmegaConf.update(tiny_cfg, "logging.wandb.mode", "offline")
    Path(tiny_cfg.run_dir).mkdir(parents=True)
    with pytest.raises(RuntimeError, match="no API key"):
        with tracking.start(tiny_cfg):
            tracking.log({"probe/value": 1.0})
    assert tracking._RUN is None


def test_disabled_starts_nothing(tiny_cfg):
    Path(tiny_cfg.run_dir).mkdir(parents=True)
    with tracking.start(tiny_cfg) as run:
        assert run is None and tracking._run() is None
        tracking.log({"probe/value": 1.0})  # a no-op
    assert not (Path(tiny_cfg.run_dir) / "wandb").exists()
