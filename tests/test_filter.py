"""Filter and retrain (stage `filter`, clipbd.curation.filter): the exclusion list and its keys."""

from __future__ import annotations

import json
import shutil

import numpy as np

from clipbd.curation.filter import top_fraction
from clipbd.data.loader import ShardDataset
from clipbd.data.shards import build_index
from clipbd.data.synthetic import write_split
from clipbd.runstate import stage_key
from conftest import compose_cfg, run_cli


def test_top_fraction_drops_the_highest_scores_ties_by_index():
    s = np.array([0.1, 5.0, 3.0, 5.0, 0.2, 3.0, 9.0, 0.0, 1.0, 2.0])
    assert top_fraction(s, 0.3).tolist() == [1, 3, 6]
    assert top_fraction(s, 0.4).tolist() == [1, 2, 3, 6]  # 3.0 at 2 before 3.0 at 5
    assert top_fraction(s, 0.0).tolist() == []


def test_excluded_samples_are_never_read(tmp_path):
    shards = write_split(tmp_path, "train", 60, 20, 3)
    index = build_index(shards, progress=False)
    seen = [it["index"] for it in ShardDataset(index, range(3), lambda im: __import__("torch").zeros(1),
                                               exclude=[0, 25, 59])]
    assert sorted(seen) == sorted(set(range(60)) - {0, 25, 59})


def test_pretrain_key_changes_only_with_a_filter(tmp_path):
    base = stage_key(compose_cfg([], run_dir=tmp_path), "pretrain")
    assert stage_key(compose_cfg(["filter.detector=kdist"], run_dir=tmp_path), "pretrain") == base
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "filter.json").write_text(json.dumps({"key": "abc", "outputs": {}}))
    filtered = stage_key(compose_cfg(["filter.source_run=/x"], run_dir=tmp_path), "pretrain")
    assert filtered != base
    (tmp_path / "stages" / "filter.json").write_text(json.dumps({"key": "other", "outputs": {}}))
    assert stage_key(compose_cfg(["filter.source_run=/x"], run_dir=tmp_path), "pretrain") != filtered


def test_filter_then_pretrain_on_the_rest(smoke_run, tmp_path):
    src = smoke_run[0]
    run_dir = tmp_path / "fr"
    proc = run_cli("+experiment=smoke", f"hydra.run.dir={run_dir}", f"filter.source_run={src}", "filter.drop_fraction=0.25",
                   "stages=[data,poison,filter,pretrain]", "logging.wandb.mode=disabled")
    excl = json.loads((run_dir / "filter" / "excluded.json").read_text())
    assert excl["num_excluded"] == 100 and "100 samples excluded" in proc.stderr
    # the retrained model saw only the kept samples (its per-sample losses: NaN where unseen)
    import h5py
    with h5py.File(next((run_dir / "sample_loss").glob("*.h5"))) as f:
        loss = f["loss"][()]
    assert np.isnan(loss[excl["excluded"]]).all() and np.isfinite(loss).sum() > 0
    other = tmp_path / "other"
    bad = run_cli("+experiment=smoke", f"hydra.run.dir={other}", f"filter.source_run={src}", "seed=5",
                  "stages=[data,poison,filter]", "logging.wandb.mode=disabled", check=False)
    assert bad.returncode == 2 and "poison plan" in bad.stderr
    shutil.rmtree(other, ignore_errors=True)


def _fr_run(root, name, detector, drop, asr, clean, poisons_excluded):
    import yaml

    run = root / name
    (run / "filter").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "filter": {"detector": detector,
                                                                            "drop_fraction": drop}}))
    (run / "metrics.json").write_text(json.dumps({"attack/asr": asr, "eval/clean_acc": clean}))
    (run / "filter" / "excluded.json").write_text(json.dumps(
        {"num_excluded": int(drop * 1000), "poisons_excluded": poisons_excluded, "poisons": 50}))
    return run


def test_filter_collector_adds_the_source_as_nothing_dropped_for_every_detector(tmp_path):
    import csv
    import subprocess
    import sys

    import yaml

    from conftest import ROOT

    runs = [_fr_run(tmp_path, "d10", "dao", 0.10, 0.05, 0.7, 50), _fr_run(tmp_path, "d01", "dao", 0.01, 0.9, 0.8, 10),
            _fr_run(tmp_path, "k10", "kdist", 0.10, 0.04, 0.71, 50)]
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.yaml").write_text(yaml.safe_dump({"seed": 0}))
    (src / "metrics.json").write_text(json.dumps({"attack/asr": 1.0, "eval/clean_acc": 0.85}))
    (src / "poison_plan.json").write_text(json.dumps({"poison_count": 50}))
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "metrics.json").write_text(json.dumps({"eval/clean_acc": 0.75}))
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run([sys.executable, str(ROOT / "experiments/filter_retrain/collect.py"), *map(str, runs),
                    "--source", str(src), "--clean", str(clean), "--floor", "0.1", "--out", str(out)],
                   check=True, capture_output=True, text=True)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["detector"], float(r["drop_fraction"]), float(r["asr"])) for r in rows] == [
        ("dao", 0.0, 1.0), ("dao", 0.01, 0.9), ("dao", 0.10, 0.05), ("kdist", 0.0, 1.0), ("kdist", 0.10, 0.04)]
    assert rows[0]["poisons"] == "50" and rows[0]["excluded"] == "0"
    assert (out / "asr_vs_dropped.png").stat().st_size > 10_000
