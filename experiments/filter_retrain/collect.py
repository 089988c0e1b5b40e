"""Collect filter-and-retrain runs into results.csv and a plot of ASR and clean accuracy against the
dropped fraction, one line per detector (README.md here says how the runs are made):

    python experiments/filter_retrain/collect.py RUN_DIR... [--source SOURCE_RUN]
        [--clean CLEAN_RUN | --clean-acc ACC] [--floor ASR] [--out experiments/filter_retrain]

A run directory is one `+experiment=filter_retrain` run (its config.yaml names filter.detector and
filter.drop_fraction, its metrics.json holds attack/asr and eval/clean_acc). `--source` adds the
filtered run's source as x = 0 of every detector (nothing dropped is the same training for all of
them: same data, seed and settings), instead of retraining it once per detector. `--clean` adds the
clean run of the same seed (attack=none) as a reference line of clean accuracy; `--floor` the ASR the
poisoned run's trigger reaches on that clean model (floor.py), the ASR no filter can go below.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import yaml


def row(run: Path) -> dict:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    m = json.loads((run / "metrics.json").read_text())
    excl_path = run / "filter" / "excluded.json"
    excl = json.loads(excl_path.read_text()) if excl_path.exists() else {}
    return {"run": str(run), "detector": cfg["filter"]["detector"], "drop_fraction": cfg["filter"]["drop_fraction"],
            "kept_fraction": 1 - cfg["filter"]["drop_fraction"], "seed": cfg["seed"],
            "excluded": excl.get("num_excluded"), "poisons_excluded": excl.get("poisons_excluded"),
            "poisons": excl.get("poisons"), "asr": m.get("attack/asr"), "clean_acc": m.get("eval/clean_acc")}


def source_rows(source: Path, detectors: list[str]) -> list[dict]:
    cfg = yaml.safe_load((source / "config.yaml").read_text())
    m = json.loads((source / "metrics.json").read_text())
    plan_path = source / "poison_plan.json"
    poisons = json.loads(plan_path.read_text())["poison_count"] if plan_path.exists() else None
    return [{"run": str(source), "detector": det, "drop_fraction": 0.0, "kept_fraction": 1.0, "seed": cfg["seed"],
             "excluded": 0, "poisons_excluded": 0, "poisons": poisons,
             "asr": m.get("attack/asr"), "clean_acc": m.get("eval/clean_acc")} for det in detectors]


def plot(rows: list[dict], clean: dict | None, floor: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for det in sorted({r["detector"] for r in rows}):
        rs = sorted((r for r in rows if r["detector"] == det), key=lambda r: r["drop_fraction"])
        x = [100 * r["drop_fraction"] for r in rs]
        axes[0].plot(x, [r["asr"] for r in rs], "o-", label=det)
        axes[1].plot(x, [r["clean_acc"] for r in rs], "o-", label=det)
    if floor is not None:
        axes[0].axhline(floor, color="k", ls=":", label="clean model, same trigger")
        axes[0].legend(fontsize=8)
    if clean is not None:
        axes[1].axhline(clean["eval/clean_acc"], color="k", ls=":", label="clean run (attack=none)")
    axes[0].set(xlabel="training samples dropped (%)", ylabel="attack success rate", ylim=(-0.02, 1.02))
    axes[1].set(xlabel="training samples dropped (%)", ylabel="clean zero-shot accuracy")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--source", type=Path, default=None, help="the source run, as x = 0 of every detector")
    clean_ref = ap.add_mutually_exclusive_group()
    clean_ref.add_argument("--clean", type=Path, default=None, help="the clean run of the same seed (attack=none)")
    clean_ref.add_argument("--clean-acc", type=float, default=None,
                           help="that clean run's eval/clean_acc, when the run dir itself is gone")
    ap.add_argument("--floor", type=float, default=None, help="ASR of the trigger on the clean model (floor.py)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = ap.parse_args()
    rows = [row(r) for r in args.runs if (r / "metrics.json").exists()]
    if args.source is not None:
        have_zero = {r["detector"] for r in rows if r["drop_fraction"] == 0}
        rows += source_rows(args.source, sorted({r["detector"] for r in rows} - have_zero))
    with open(args.out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(sorted(rows, key=lambda r: (r["detector"], r["drop_fraction"])))
    if args.clean is not None:
        clean = json.loads((args.clean / "metrics.json").read_text())
    else:
        clean = None if args.clean_acc is None else {"eval/clean_acc": args.clean_acc}
    plot(rows, clean, args.floor, args.out / "asr_vs_dropped.png")
    print(f"{len(rows)} runs -> {args.out / 'results.csv'}, {args.out / 'asr_vs_dropped.png'}")


if __name__ == "__main__":
    main()
