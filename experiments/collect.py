#!/usr/bin/env python
"""Collect the runs of a sweep into one table and a plot of detection AUROC against poison rate.

    python -m clipbd.run -m hydra/launcher=slurm +experiment=smoke detector=dao,slof \
        attack.poison_rate=0.01,0.05 hydra.sweep.dir=multirun/rates
    python experiments/collect.py multirun/rates --out experiments/rates

Every directory under the given paths that holds a `metrics.json` is a run; its `config.yaml` says
what it was. One row per (run, detector): `results.csv`, `results.md` and `auroc_vs_poison_rate.png`
(one line per detector and attack) in `--out`.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import yaml

COLUMNS = ["run", "name", "attack", "poison_rate", "seed", "detector", "auroc", "auprc", "fpr95",
           "clean_acc", "asr"]


def find_runs(paths: list[Path]) -> list[Path]:
    runs = {p.parent for root in paths for p in Path(root).rglob("metrics.json")}
    return sorted(runs, key=lambda p: (str(p.parent), _num(p.name)))


def _num(name: str) -> tuple:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def attack_name(cfg: dict) -> str:
    node = cfg.get("attack")
    if not node:
        return "none"
    return str(node.get("_target_", "?")).rsplit(".", 1)[-1].lower()


def rows_of(run: Path, root: Path | None = None) -> list[dict]:
    """One row per detector reported in the run's metrics.json."""
    metrics = json.loads((run / "metrics.json").read_text())
    cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").exists() else {}
    detectors = sorted({k.split("/")[1] for k in metrics if k.startswith("detect/") and k.count("/") == 2})
    base = {"run": str(run.relative_to(root)) if root and run.is_relative_to(root) else str(run),
            "name": cfg.get("name"), "attack": attack_name(cfg),
            "poison_rate": (cfg.get("attack") or {}).get("poison_rate", 0.0), "seed": cfg.get("seed"),
            "clean_acc": metrics.get("eval/clean_acc"), "asr": metrics.get("attack/asr")}
    return [base | {"detector": d, **{m: metrics.get(f"detect/{d}/{m}") for m in ("auroc", "auprc", "fpr95")}}
            for d in detectors]


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))


def write_tables(rows: list[dict], out: Path) -> None:
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    series: dict[tuple, list] = {}
    for r in rows:
        if r["auroc"] is not None:
            series.setdefault((r["detector"], r["attack"]), []).append((float(r["poison_rate"]), r["auroc"]))
    for (det, att), pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{det} ({att})")
    rates = [float(r["poison_rate"]) for r in rows if float(r["poison_rate"]) > 0]
    if rates and max(rates) / min(rates) >= 10:
        ax.set_xscale("log")
    ax.set(xlabel="poison rate", ylabel="AUROC", ylim=(0, 1.02), title="detection AUROC vs poison rate")
    ax.axhline(0.5, color="grey", lw=0.5, ls=":")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", type=Path, help="sweep or run directories (searched recursively)")
    ap.add_argument("--out", type=Path, required=True, help="where results.{csv,md} and the plot go")
    args = ap.parse_args(argv)
    runs = find_runs(args.paths)
    if not runs:
        print(f"collect: no metrics.json under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    root = args.paths[0].resolve() if len(args.paths) == 1 else None
    rows = [r for run in runs for r in rows_of(run.resolve(), root)]
    args.out.mkdir(parents=True, exist_ok=True)
    write_tables(rows, args.out)
    plot(rows, args.out / "auroc_vs_poison_rate.png")
    print(f"collect: {len(runs)} runs, {len(rows)} rows -> {args.out}/results.md, results.csv, auroc_vs_poison_rate.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
