#!/usr/bin/env python
"""Collect the detector table of experiments/detectors_default/run.sh into results.md / results.csv.

    python experiments/detectors_default/collect.py outputs/detectors_default --base outputs/default \
        --out experiments/detectors_default

One row per setting directory (its `metrics.json`, written by `reduce`), one AUROC and one AUPRC
column per detector, plus the extract and reduce seconds from `stages/*.json`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

DETECTORS = ["dao", "slof", "kdist", "lid", "iforest", "clipscore", "abl", "cd"]


def row_of(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    row = {"setting": run.name}
    for d in DETECTORS:
        for metric in ("auroc", "auprc"):
            v = m.get(f"detect/{d}/{metric}")
            row[f"{d}_{metric}"] = "" if v is None else f"{v:.3f}"
    for stage in ("extract", "reduce"):
        marker = run / "stages" / f"{stage}.json"
        row[f"{stage}_s"] = f"{json.loads(marker.read_text())['seconds']:.1f}" if marker.exists() else ""
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="directory holding one run directory per setting")
    p.add_argument("--base", type=Path, required=True, help="the default run the settings share")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    runs = [d for d in a.root.iterdir() if (d / "metrics.json").exists()]
    runs.sort(key=lambda d: (d / "metrics.json").stat().st_mtime)  # the order run.sh ran them in
    if not runs:
        raise SystemExit(f"collect.py: no setting under {a.root} has a metrics.json")
    rows = [row_of(r) for r in runs]
    a.out.mkdir(parents=True, exist_ok=True)
    with open(a.out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    base = json.loads((a.base / "metrics.json").read_text())
    plan = json.loads((a.base / "poison_plan.json").read_text())
    lines = [f"Base run: `{os.path.relpath(a.base)}` — clean acc {base['eval/clean_acc']:.4f}, ASR {base['attack/asr']:.3f}, "
             f"{plan['poison_count']} poisoned of {plan.get('num_samples', '?')} training samples.", ""]
    for metric in ("auroc", "auprc"):
        used = [d for d in DETECTORS if any(r[f"{d}_{metric}"] for r in rows)]
        lines += [f"**{metric.upper()}**", "", "| setting | " + " | ".join(used) + " | extract s | reduce s |",
                  "|---|" + "---:|" * (len(used) + 2)]
        lines += ["| " + " | ".join([r["setting"], *(r[f"{d}_{metric}"] for d in used), r["extract_s"],
                                     r["reduce_s"]]) + " |" for r in rows]
        lines.append("")
    (a.out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
