"""A run directory's record (issue 12): a failed attempt leaves the completed run's config.yaml and
meta.json as they were, keeps its own record and error beside them and in run.log; a re-run with
nothing to do starts no new W&B run; the smoke run's scores survive a detector change re-scored from
the stored embeddings."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow


def test_failed_attempt_keeps_the_completed_record(tmp_path):
    run = tmp_path / "run"
    run_cli("+experiment=smoke", f"hydra.run.dir={run}")
    config, meta = (run / "config.yaml").read_bytes(), (run / "meta.json").read_bytes()
    assert "finished" in json.loads(meta) and not (run / "attempts").exists()
    offline = sorted((run / "wandb").glob("offline-run-*"))

    # nothing to do: every stage skipped, no new offline W&B run, the record re-promoted
    proc = run_cli("+experiment=smoke", f"hydra.run.dir={run}")
    assert "nothing run" in proc.stderr
    assert sorted((run / "wandb").glob("offline-run-*")) == offline

    # a setting that fails inside a stage (pretraining refuses checkpoints of another config)
    proc = run_cli("+experiment=smoke", f"hydra.run.dir={run}", "train.lr=0.5", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("clipbd: error: ")
    error = proc.stderr.strip().splitlines()[-1].removeprefix("clipbd: error: ")
    assert (run / "config.yaml").read_bytes() == config
    assert json.loads((run / "meta.json").read_text())["overrides"] == json.loads(meta)["overrides"]
    attempts = list((run / "attempts").iterdir())
    assert len(attempts) == 1
    record = json.loads((attempts[0] / "meta.json").read_text())
    assert record["error"] == error and "train.lr=0.5" in record["overrides"]
    assert "lr: 0.5" in (attempts[0] / "config.yaml").read_text()
    assert error in (run / "run.log").read_text()
