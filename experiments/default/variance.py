"""Why does in-batch detection vary between runs that all implant the trigger (issue 18)?

For each finished run directory, from its own artifacts (extraction files, metrics, losses):
  - the attack and the recorded detection (metrics.json), final training loss (train_loss.csv);
  - how tightly the poisons collapse: mean pairwise cosine of poisoned image embeddings, their norm
    against the clean ones, and the poisons' spread against the clean samples' in-batch k-distance;
  - how many poisons share a scoring batch, and DAO's AUROC by that count;
  - the same detectors re-scored offline from the stored embeddings under other scoring settings
    (batch size, k, normalised features), exactly as the pipeline's in-batch scoring cuts batches.

    python experiments/default/variance.py RUN_DIR [RUN_DIR ...] [--out experiments/default/variance]
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
    """Concatenate the run's extraction groups, keeping the group boundary (scoring batches never
    cross a group)."""
    groups = []
    for p in sorted((run / "shards").glob("extract-*.h5")):
        with h5py.File(p, "r") as f:
            groups.append({"image": f["image_emb"][:], "poisoned": f["poisoned"][:].astype(bool),
                           "batch": f["score_batch"][:]})
    return {"groups": groups, "metrics": json.loads((run / "metrics.json").read_text()),
            "loss": _final_loss(run / "train_loss.csv")}


def _final_loss(path: Path) -> float:
    rows = list(csv.DictReader(path.open()))
    last = max(int(r["epoch"]) for r in rows)
    vals = [float(r["loss"]) for r in rows if int(r["epoch"]) == last]
    return float(np.mean(vals))


def rescore(groups: list[dict], batch_size: int, k: int, normalise: bool) -> dict[str, float]:
    """AUROC of each method with batches cut as clipbd.scoring.score_in_batch cuts them."""
    scores = {m: [] for m in METHODS}
    labels = []
    for g in groups:
        x = g["image"] / np.linalg.norm(g["image"], axis=1, keepdims=True) if normalise else g["image"]
        n = len(x)
        for rows in np.array_split(np.arange(n), max(1, int(round(n / batch_size)))):
            s = knn_scores(x[rows], k=k, methods=METHODS)
            for m in METHODS:
                scores[m].append(s[m])
        labels.append(g["poisoned"])
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
    # clean in-batch k-distance at the run's own setting (score batches as written by extract)
    kd_clean, kd_poison = [], []
    for g in groups:
        for b in np.unique(g["batch"]):
            rows = g["batch"] == b
            s = knn_scores(g["image"][rows], k=k, methods=("kdist",))["kdist"]
            kd_clean.append(s[~g["poisoned"][rows]])
            kd_poison.append(s[g["poisoned"][rows]])
    kd_c, kd_p = np.concatenate(kd_clean), np.concatenate(kd_poison)
    return {"poison_cos": float(off.mean()), "norm_ratio": float(norm_ratio),
            "poison_spread": float(spread), "clean_kdist_median": float(np.median(kd_c)),
            "poison_kdist_median": float(np.median(kd_p)),
            "spread_over_clean_kdist": float(spread / np.median(kd_c))}


def by_count(groups: list[dict], k: int = 16) -> dict[int, tuple[int, float]]:
    """DAO AUROC of the poisons in batches holding c poisons (c binned), against all clean samples."""
    dao, lab, cnt = [], [], []
    for g in groups:
        for b in np.unique(g["batch"]):
            rows = g["batch"] == b
            s = knn_scores(g["image"][rows], k=k, methods=("dao",))["dao"]
            dao.append(s)
            lab.append(g["poisoned"][rows])
            cnt.append(np.full(rows.sum(), g["poisoned"][rows].sum()))
    dao, lab, cnt = map(np.concatenate, (dao, lab, cnt))
    out = {}
    for lo, hi in ((0, 4), (4, 7), (7, 10), (10, 99)):
        sel = lab & (cnt >= lo) & (cnt < hi)
        if sel.sum():
            y = np.r_[np.ones(sel.sum()), np.zeros((~lab).sum())]
            out[f"{lo}-{hi - 1}"] = (int(sel.sum()), roc_auc_score(y, np.r_[dao[sel], dao[~lab]]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("experiments/default/variance"))
    args = ap.parse_args()
    md = ["# Detection variance across runs (generated by experiments/default/variance.py)", ""]
    head = "| run | ASR | clean acc | final loss | DAO | k-dist | SLOF | poison cos | norm ratio | spread / clean k-dist | poisons per batch (mean, max) |"
    md += [head, "|" + "---|" * (head.count("|") - 1)]
    grid_rows, count_rows = [], []
    for run in args.runs:
        r = load_run(run)
        m = r["metrics"]
        col = collapse(r["groups"])
        per_batch = [g["poisoned"][g["batch"] == b].sum() for g in r["groups"] for b in np.unique(g["batch"])]
        md.append(f"| {run.name} | {m['attack/asr']:.3f} | {m['eval/clean_acc']:.3f} | {r['loss']:.3f} | "
                  f"{m['detect/dao/auroc']:.3f} | {m['detect/kdist/auroc']:.3f} | {m['detect/slof/auroc']:.3f} | "
                  f"{col['poison_cos']:.3f} | {col['norm_ratio']:.2f} | {col['spread_over_clean_kdist']:.2f} | "
                  f"{np.mean(per_batch):.1f}, {max(per_batch)} |")
        count_rows.append((run.name, by_count(r["groups"])))
        for bs, k, norm in GRID:
            a = rescore(r["groups"], bs, k, norm)
            grid_rows.append({"run": run.name, "batch_size": bs, "k": k, "normalised": norm,
                              **{m: round(v, 4) for m, v in a.items()}})
    md += ["", "## DAO AUROC by the number of poisons in the poison's scoring batch (batch 128, k 16)", ""]
    bins = sorted({b for _, d in count_rows for b in d}, key=lambda s: int(s.split("-")[0]))
    md += ["| run | " + " | ".join(f"{b} poisons (n, AUROC)" for b in bins) + " |",
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
