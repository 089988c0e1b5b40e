"""Collect filter-and-retrain runs into results.csv and a plot of ASR and clean accuracy against the
dropped fraction, one line per detector (README.md here says how the runs are made):

    python experiments/filter_retrain/collect.py RUN_DIR... [--clean CLEAN_RUN] [--out experiments/filter_retrain]

A run directory is one `+experiment=filter_retrain` run (its config.yaml names filter.detector and
filter.drop_fraction, its metrics.json holds attack/asr and eval/clean_acc); `--clean` adds the clean
run of the same seed (attack=none) as a reference line.
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


def plot(rows: list[dict], clean: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for det in sorted({r["detector"] for r in rows}):
        rs = sorted((r for r in rows if r["detector"] == det), key=lambda r: r["drop_fraction"])
        x = [100 * r["drop_fraction"] for r in rs]
        axes[0].plot(x, [r["asr"] for r in rs], "o-", label=det)
        axes[1].plot(x, [r["clean_acc"] for r in rs], "o-", label=det)
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
    ap.add_argument("--clean", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = ap.parse_args()
    rows = [row(r) for r in args.runs if (r / "metrics.json").exists()]
    with open(args.out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(sorted(rows, key=lambda r: (r["detector"], r["drop_fraction"])))
    clean = json.loads((args.clean / "metrics.json").read_text()) if args.clean else None
    plot(rows, clean, args.out / "asr_vs_dropped.png")
    print(f"{len(rows)} runs -> {args.out / 'results.csv'}, {args.out / 'asr_vs_dropped.png'}")


if __name__ == "__main__":
    main()
