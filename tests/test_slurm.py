"""On a real single-node SLURM cluster (launchers/slurm_local.sh installs and starts it, and stops it
afterwards): DDP over 2 SLURM tasks, the extraction job array, a cancelled task and re-submission,
requeue after preemption, and a sweep through the Hydra SLURM launcher. Smoke-sized runs.
Run alone with `pytest -m slurm`; `make test-fast` leaves them out.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cli

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
SCRIPT = ROOT / "launchers" / "slurm_local.sh"
SMOKE = ["+experiment=smoke", "extract.shards_per_group=1"]  # 4 shards -> 4 extraction groups


def _sh(*args: str, check: bool = True) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=600)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@pytest.fixture(scope="module")
def cluster():
    """The local cluster: started (installing SLURM if needed) for this module and stopped after,
    unless it was already running, in which case it is left as found."""
    was_up = "slurmctld: running" in _sh("bash", str(SCRIPT), "status", check=False)
    if not was_up and os.geteuid() != 0:
        pytest.skip("starting the local SLURM cluster needs root (launchers/slurm_local.sh up)")
    t0 = time.time()
    _sh("bash", str(SCRIPT), "up")
    print(f"\nslurm_local.sh up: {time.time() - t0:.1f} s")
    yield
    if not was_up:
        _sh("bash", str(SCRIPT), "down")


def _losses(path: Path) -> list[float]:
    with open(path) as fh:
        return [float(r["loss"]) for r in csv.DictReader(fh)]


def test_ddp_two_tasks_same_loss_curve_as_one_process(cluster, tmp_path):
    args = [*SMOKE, "train.batch_size=32", "stages=[data,poison,pretrain]"]
    run_cli(*args, f"hydra.run.dir={tmp_path / 'one'}")
    sweep = tmp_path / "two"
    run_cli("-m", "hydra/launcher=slurm", "hydra.launcher.tasks_per_node=2", *args, f"hydra.sweep.dir={sweep}")
    run = sweep / "0"
    assert sorted(p.name for p in sweep.iterdir()) == [".submitit", "0", "multirun.yaml"]  # one run dir
    assert '"world": 2' in (run / "meta.json").read_text()
    one, two = _losses(tmp_path / "one" / "train_loss.csv"), _losses(run / "train_loss.csv")
    assert len(one) == len(two) == 400 // 32
    diff = max(abs(a - b) for a, b in zip(one, two))
    print(f"loss curve, 1 process vs 2 SLURM tasks: {len(one)} steps, max |diff| = {diff:.3g}")
    assert diff < 1e-4
    w1 = torch.load(tmp_path / "one" / "checkpoints" / "latest.pt", weights_only=True)["model"]
    w2 = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)["model"]
    # Weights agree to Adam's step scale: parameters whose true gradient is 0 (attention's key bias)
    # get float noise as gradient, which Adam normalises into updates of up to lr (1e-3) per step.
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory) -> Path:
    """A single-process run of data, poison, pretrain, extract and reduce (no SLURM)."""
    ref = tmp_path_factory.mktemp("ref") / "run"
    run_cli(*SMOKE, "stages=[data,poison,pretrain,extract,reduce]", f"hydra.run.dir={ref}")
    return ref


def _trained_copy(ref: Path, dst: Path) -> Path:
    """A run dir holding `ref`'s data, poison plan and checkpoint but nothing extracted yet."""
    dst.mkdir(parents=True)
    for name in ("data", "checkpoints"):
        shutil.copytree(ref / name, dst / name)
    for name in ("data.json", "data_index.h5", "poison_plan.json", "meta.json", "wandb_id.txt"):
        shutil.copy2(ref / name, dst / name)
    (dst / "stages").mkdir()
    for name in ("data", "poison", "pretrain"):
        shutil.copy2(ref / "stages" / f"{name}.json", dst / "stages" / f"{name}.json")
    return dst


def test_extraction_array_bitwise_identical(reference, tmp_path):
    from clipbd.launch import submit_chain

    run = _trained_copy(reference, tmp_path / "run")
    chain = submit_chain([*SMOKE, "stages=[extract,reduce]"], run, extract_tasks=4)
    assert len(chain.jobs["extract"]) == 4
    chain.wait()
    assert sorted(p.name for p in (run / "shards").glob("*.h5")) == [f"extract-0000{g}.h5" for g in range(4)]
    assert (run / "scores.h5").read_bytes() == (reference / "scores.h5").read_bytes()


def _state(job_id: str) -> str:
    return _sh("squeue", "-h", "-j", job_id, "-o", "%T", check=False).strip()


def test_cancelled_task_then_resubmitted_chain(reference, tmp_path):
    from clipbd.launch import submit_chain

    run = _trained_copy(reference, tmp_path / "run")
    overrides = [*SMOKE, "stages=[data,poison,pretrain,extract,reduce]"]
    chain = submit_chain(overrides, run, extract_tasks=4)
    victim = chain.jobs["extract"][1].job_id  # task 1: group 1, shard train-00001.tar
    deadline = time.time() + 900
    while _state(victim) != "RUNNING":
        assert time.time() < deadline, f"extraction task {victim} never started"
        time.sleep(0.2)
    # mid-way: the task is still importing torch or embedding. SIGKILL, because a plain scancel sends
    # SIGTERM first, which submitit ignores, and an idle machine finishes the task within KillWait.
    _sh("scancel", "--signal=KILL", victim)
    with pytest.raises(Exception):
        chain.wait()  # the cancelled task fails the chain; reduce is cancelled (invalid dependency)
    assert not (run / "shards" / "extract-00001.h5").exists()
    assert "CANCELLED" in _sh("sacct", "-n", "-X", "-j", victim, "-o", "State")
    proc = run_cli(*SMOKE, "stages=[reduce]", f"hydra.run.dir={run}", check=False)
    assert proc.returncode == 2
    err = proc.stderr
    assert "extract-00001.h5" in err and "train-00001.tar" in err and "extract.groups=[1]" in err, err
    assert not (run / "scores.h5").exists()
    again = submit_chain(overrides, run, extract_tasks=4)
    again.wait()
    assert (run / "scores.h5").read_bytes() == (reference / "scores.h5").read_bytes()
    log = (run / "run.log").read_text()
    assert "stage pretrain complete, skipped" in log.replace("  ", " ")


def test_preempted_pretraining_is_requeued_and_resumes(cluster, tmp_path):
    from clipbd.launch import submit_chain

    run = tmp_path / "run"
    chain = submit_chain([*SMOKE, "train.epochs=3", "stages=[data,poison,pretrain]"], run)
    job = chain.jobs["train"][0]
    deadline = time.time() + 900
    while not (run / "checkpoints" / "epoch_1.pt").exists():
        assert time.time() < deadline and job.state not in ("FAILED", "COMPLETED"), job.state
        time.sleep(0.2)
    _sh("scancel", "--signal=USR2", job.job_id)  # what SLURM sends before preempting (submitit)
    while (state := _state(job.job_id)) not in ("PENDING", ""):  # "": already requeued and done
        assert time.time() < deadline, f"job {job.job_id} was not requeued ({state})"
        time.sleep(0.2)
    # SLURM makes a requeued batch job eligible only minutes later; release it now (test speed).
    _sh("scontrol", "update", f"JobId={job.job_id}", "StartTime=now", check=False)
    job.result()  # the requeued job finishes
    log = (run / "run.log").read_text()
    assert "resuming from" in log, log[-2000:]
    assert (run / "checkpoints" / "epoch_3.pt").exists()
    epochs = [int(r["epoch"]) for r in csv.DictReader(open(run / "train_loss.csv"))]
    assert epochs == sorted(epochs) and set(epochs) == {1, 2, 3}
    restarts = _sh("sacct", "-n", "-X", "-D", "-j", job.job_id, "-o", "State").split()
    assert "REQUEUED" in restarts or "PREEMPTED" in restarts, restarts


def test_sweep_two_detectors_two_rates_collected(cluster, tmp_path):
    sweep = tmp_path / "sweep"
    run_cli("-m", "hydra/launcher=slurm", "+experiment=smoke", "detector=dao,slof", "attack.poison_rate=0.02,0.05",
            "stages=[data,poison,pretrain,extract,reduce]", f"hydra.sweep.dir={sweep}")
    out = tmp_path / "table"
    _sh(str(Path(os.sys.executable)), str(ROOT / "experiments" / "collect.py"), str(sweep), "--out", str(out))
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4
    assert {(r["detector"], float(r["poison_rate"])) for r in rows} == {
        (d, p) for d in ("dao", "slof") for p in (0.02, 0.05)}
    assert (out / "results.md").read_text().count("\n") == 6 and (out / "auroc_vs_poison_rate.png").stat().st_size
    groups = {line for d in sweep.iterdir() if (d / "config.yaml").exists()
              for line in (d / "config.yaml").read_text().splitlines() if line.strip().startswith("group:")}
    assert len(groups) == 1 and "smoke-sweep" in groups.pop()  # one W&B group for the sweep
