"""Why does in-batch detection vary between runs that all implant the trigger (issue 18)?

For each finished run directory, from its own artifacts (extraction files, metrics, losses):
  - the attack and the recorded detection (metrics.json), final training loss (train_loss.csv);
  - how tightly the poisons collapse: mean pairwise cosine of poisoned image embeddings, their norm
    against the clean ones, and the poisons' spread against the clean samples' in-batch k-distance;
  - how many poisons share a scoring batch, and DAO's AUROC by that count;
  - the same detectors re-scored offline from the stored embeddings under other scoring settings
    (batch size, k, normalised features), exactly as the pipeline's in-batch scoring cuts batches.

    python experiments/default/variance.py RUN_DIR [RUN_DIR ...] [--out experiments/default/variance]
        [--grid 1024:128,1024:256,1024:384n]   # batch:k pairs (n: L2-normalised features); default GRID
writes <out>.md (one table per question) and <out>.csv (the re-scoring grid, one row per run x setting).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import h5py
import numpy as np
from sklearn.metrics import roc_auc_score

from clipbd.detectors import knn_scores

METHODS = ("kdist", "slof", "dao")
GRID = [(bs, k, False) for bs in (64, 128, 256) for k in (8, 16, 32) if k < bs // 2]
GRID += [(128, 24, False), (256, 48, False), (512, 32, False), (512, 64, False), (1024, 64, False),
         (1024, 128, False), (128, 16, True), (256, 32, True)]


def load_run(run: Path) -> dict:
    """The run's extraction groups (scoring batches never cross a group)."""
    groups = []
    for p in sorted((run / "shards").glob("extract-*.h5")):
        with h5py.File(p, "r") as f:
            groups.append({"image": f["image_emb"][:], "poisoned": f["poisoned"][:].astype(bool)})
    return {"groups": groups, "metrics": json.loads((run / "metrics.json").read_text()),
            "loss": _final_loss(run / "train_loss.csv")}


def _final_loss(path: Path) -> float:
    rows = list(csv.DictReader(path.open()))
    last = max(int(r["epoch"]) for r in rows)
    vals = [float(r["loss"]) for r in rows if int(r["epoch"]) == last]
    return float(np.mean(vals))


def batches(groups: list[dict], batch_size: int):
    """(group, rows) of every scoring batch, cut as clipbd.scoring's in-batch mode cuts them: each
    group's rows in index order into round(n / batch_size) near-equal batches."""
    for g in groups:
        n = len(g["image"])
        for rows in np.array_split(np.arange(n), max(1, int(round(n / batch_size)))):
            yield g, rows


def rescore(groups: list[dict], batch_size: int, k: int, normalise: bool) -> dict[str, float]:
    """AUROC of each method, in-batch at (batch_size, k)."""
    scores = {m: [] for m in METHODS}
    labels = []
    for g, rows in batches(groups, batch_size):
        x = g["image"][rows]
        x = x / np.linalg.norm(x, axis=1, keepdims=True) if normalise else x
        s = knn_scores(x, k=k, methods=METHODS)
        for m in METHODS:
            scores[m].append(s[m])
        labels.append(g["poisoned"][rows])
    y = np.concatenate(labels)
    return {m: roc_auc_score(y, np.concatenate(v)) for m, v in scores.items()}


def collapse(groups: list[dict], k: int = 16) -> dict[str, float]:
    x = np.concatenate([g["image"] for g in groups])
    y = np.concatenate([g["poisoned"] for g in groups])
    p, c = x[y], x[~y]
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    cos = pn @ pn.T
    off = cos[~np.eye(len(p), dtype=bool)]
    norm_ratio = np.linalg.norm(p, axis=1).mean() / np.linalg.norm(c, axis=1).mean()
    spread = np.linalg.norm(p - p.mean(0), axis=1).mean()  # poisons' distance to their centroid
    # clean in-batch k-distance in 128-batches at k = 16
    kd_clean, kd_poison = [], []
    for g, rows in batches(groups, 128):
        s = knn_scores(g["image"][rows], k=k, methods=("kdist",))["kdist"]
        kd_clean.append(s[~g["poisoned"][rows]])
        kd_poison.append(s[g["poisoned"][rows]])
    kd_c, kd_p = np.concatenate(kd_clean), np.concatenate(kd_poison)
    return {"poison_cos": float(off.mean()), "norm_ratio": float(norm_ratio),
            "poison_spread": float(spread), "clean_kdist_median": float(np.median(kd_c)),
            "poison_kdist_median": float(np.median(kd_p)),
            "spread_over_clean_kdist": float(spread / np.median(kd_c))}


FRACTION_BINS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 9.0))


def by_count(groups: list[dict], batch_size: int, k: int) -> dict[str, tuple[int, float]]:
    """DAO AUROC of the poisons whose scoring batch holds c poisons, binned by c / k, against all
    clean samples: how detection degrades as the other poisons fill a poison's k neighbours."""
    dao, lab, frac = [], [], []
    for g, rows in batches(groups, batch_size):
        dao.append(knn_scores(g["image"][rows], k=k, methods=("dao",))["dao"])
        lab.append(g["poisoned"][rows])
        frac.append(np.full(len(rows), g["poisoned"][rows].sum() / k))
    dao, lab, frac = map(np.concatenate, (dao, lab, frac))
    out = {}
    for lo, hi in FRACTION_BINS:
        sel = lab & (frac >= lo) & (frac < hi)
        if sel.sum():
            y = np.r_[np.ones(sel.sum()), np.zeros((~lab).sum())]
            out[f"{lo:.2f}-{hi:.2f}" if hi < 9 else f">= {lo:.2f}"] = (int(sel.sum()), roc_auc_score(y, np.r_[dao[sel], dao[~lab]]))
    return out


def parse_grid(text: str) -> list[tuple[int, int, bool]]:
    """'1024:256,256:48n' -> [(1024, 256, False), (256, 48, True)]."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        bs, _, k = item.partition(":")
        norm = k.endswith("n")
        try:
            out.append((int(bs), int(k.rstrip("n")), norm))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--grid item {item!r} is not batch:k (e.g. 1024:256 or 1024:256n)") from None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("experiments/default/variance"))
    ap.add_argument("--grid", type=parse_grid, default=GRID,
                    help="re-scoring settings as batch:k pairs, comma-separated; a trailing n normalises the features")
    args = ap.parse_args()
    md = ["# Detection variance across runs (generated by experiments/default/variance.py)", ""]
    head = ("| run | ASR | clean acc | final loss | DAO (as run) | k-dist (as run) | SLOF (as run) | poison cos | norm ratio | "
            "spread / clean k-dist | poisons per 128-batch (mean, max) |")
    md += [head, "|" + "---|" * (head.count("|") - 1)]
    grid_rows, count_rows = [], []
    for run in args.runs:
        r = load_run(run)
        m = r["metrics"]
        col = collapse(r["groups"])
        per_batch = [g["poisoned"][rows].sum() for g, rows in batches(r["groups"], 128)]
        md.append(f"| {run.name} | {m['attack/asr']:.3f} | {m['eval/clean_acc']:.3f} | {r['loss']:.3f} | "
                  f"{m['detect/dao/auroc']:.3f} | {m['detect/kdist/auroc']:.3f} | {m['detect/slof/auroc']:.3f} | "
                  f"{col['poison_cos']:.3f} | {col['norm_ratio']:.2f} | {col['spread_over_clean_kdist']:.2f} | "
                  f"{np.mean(per_batch):.1f}, {max(per_batch)} |")
        for bs, k in ((128, 16), (1024, 128)):
            count_rows.append((f"{run.name} ({bs}, k {k})", by_count(r["groups"], bs, k)))
        for bs, k, norm in args.grid:
            a = rescore(r["groups"], bs, k, norm)
            grid_rows.append({"run": run.name, "batch_size": bs, "k": k, "normalised": norm,
                              **{m: round(v, 4) for m, v in a.items()}})
    md += ["", "## DAO AUROC by (poisons in the poison's scoring batch) / k", ""]
    bins = [f"{lo:.2f}-{hi:.2f}" if hi < 9 else f">= {lo:.2f}" for lo, hi in FRACTION_BINS]
    md += ["| run (batch, k) | " + " | ".join(f"{b} (n, AUROC)" for b in bins) + " |",
           "|---|" + "---|" * len(bins)]
    for name, d in count_rows:
        md.append(f"| {name} | " + " | ".join(f"{d[b][0]}, {d[b][1]:.3f}" if b in d else "–" for b in bins) + " |")
    md += ["", "## Re-scored offline from the stored embeddings (AUROC)", "",
           "| run | batch | k | normalised | k-dist | SLOF | DAO |", "|---|---|---|---|---|---|---|"]
    md += [f"| {g['run']} | {g['batch_size']} | {g['k']} | {g['normalised']} | {g['kdist']:.3f} | "
           f"{g['slof']:.3f} | {g['dao']:.3f} |" for g in grid_rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    with args.out.with_suffix(".csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(grid_rows[0]))
        w.writeheader()
        w.writerows(grid_rows)
    print("\n".join(md))


if __name__ == "__main__":
    main()
