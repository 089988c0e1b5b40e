#!/usr/bin/env python
"""Learning curves (zero-shot clean accuracy of every epoch checkpoint) from the CSVs that
`averaging.py --curve --out` writes, one line per run, one panel-free figure.

    python experiments/default/plot_curves.py experiments/default/session16/curve_*.csv \\
        --out experiments/default/session16/curves.png
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def curves(paths: list[Path]) -> dict[str, list[tuple[int, float]]]:
    """{run: [(epoch, clean_acc), ...]} from the raw rows (`raw epoch_N`, and `raw`: the last epoch)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in paths:
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r["weights"].startswith("raw")]
        for r in rows:
            m = re.fullmatch(r"raw epoch_(\d+)", r["weights"])
            epoch = int(m.group(1)) if m else None
            out.setdefault(r["run"], []).append((epoch, float(r["clean_acc"])))
    for run, pts in out.items():  # "raw" is the epoch after the last numbered checkpoint
        last = max((e for e, _ in pts if e is not None), default=0)
        out[run] = sorted((e if e is not None else last + 1, a) for e, a in pts)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csvs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--title", default="zero-shot clean accuracy per epoch (2,000 held-out images)")
    args = ap.parse_args(argv)
    data = curves(args.csvs)
    if not data:
        print("plot_curves: no raw rows in the given CSVs (write them with averaging.py --curve)", file=sys.stderr)
        return 2
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run, pts in sorted(data.items()):
        ax.plot([e for e, _ in pts], [a for _, a in pts], marker="o", ms=3, label=f"{run} ({pts[-1][1]:.3f})")
    ax.axhline(0.125, color="grey", lw=0.8, ls=":", label="chance (1/8)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("clean accuracy")
    ax.set_title(args.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
