#!/usr/bin/env python
"""The default's results as a distribution over seeds: mean, min, max and spread per metric.

    python -m clipbd.run -m +experiment=seeds                     # BadNets default, seeds 0-4
    python -m clipbd.run -m +experiment=seeds attack=none         # the clean reference, same seeds
    python experiments/seeds/collect.py multirun/seeds --out experiments/seeds

Every directory under the given paths with a `metrics.json` is a run; runs are grouped by attack,
learning-rate schedule (`train.schedule`; runs from before the option: cosine; wsd's decay fraction
where not 0.2, and `+emaD` for runs that kept a weight average), the synthetic world's
class weights (`uniform`, or the weights as given), the training set's size and epochs
(`data=20000x9`; shown where the config records them; `/test10000` where the held-out split is
not 2,000 images), the tiny ViT's patch size where it is not the
4 px of the runs before session 17 (`model=patch8`) and the thread count that trained them
(`config.yaml`, the pretrain stage's marker), so one table can hold the BadNets and clean seeds, the
one-thread repeats, both schedules and both worlds. Where a group of an attack and the clean group
(`attack=none`) of the same schedule, world and threads share seeds, the summary also gives the
attack's cost in clean accuracy paired by seed (attack minus clean, same world and initialisation;
same training-set size and epochs too).
Writes `<out>/runs.csv` (one row per run), `<out>/summary.md` and `<out>/seeds.png` (every run of every
group as a point labelled with its seed, the group's mean as a bar: clean accuracy, and DAO AUROC
against the 0.95 line issue 18 sets for the default).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import yaml

METRICS = ["attack/asr", "eval/clean_acc", "detect/dao/auroc", "detect/kdist/auroc", "detect/slof/auroc",
           "detect/dao/auprc", "time/pretrain_s"]


TABLE_HEAD = ["| metric | mean | min | max | max − min | per seed |", "|---|---|---|---|---|---|"]


def _attack(cfg: dict) -> str:
    node = cfg.get("attack") or {}
    return str(node.get("_target_", "none")).rsplit(".", 1)[-1].lower() if node else "none"


def _synthetic(cfg: dict) -> dict:
    return (cfg.get("dataset") or {}).get("synthetic") or {}


def _world(cfg: dict) -> str:
    world = _synthetic(cfg).get("world") or {}
    w = world.get("class_weights")
    if not w or len(set(map(float, w))) == 1:
        return "uniform"
    return ",".join(f"{float(x):g}" for x in w)


def _data(cfg: dict) -> str:
    """Training-set size x epochs (`20000x9`), or "" where the config does not say (hand-made rows),
    and the held-out split's size where it is not the 2,000 of the runs before session 18
    (`20000x18/test10000`): accuracies on other test samples are other measurements."""
    syn = _synthetic(cfg)
    n, epochs, test = syn.get("num_train"), (cfg.get("train") or {}).get("epochs"), syn.get("num_test")
    out = f"{n}x{epochs}" if n and epochs else ""
    return out + (f"/test{test}" if test not in (None, 2000) else "")


def _model(cfg: dict) -> str:
    """`patch8` for a tiny ViT of another patch size than 4 px (the default's before session 17), ""
    otherwise: runs recorded before the label keep their groups."""
    vision = (((cfg.get("model") or {}).get("arch") or {}).get("vision_cfg")) or {}
    patch = vision.get("patch_size")
    return f"patch{patch}" if patch not in (None, 4) else ""


def _schedule(cfg: dict) -> str:
    """`train.schedule` (runs from before the option: cosine), with wsd's decay fraction where it is
    not 0.2 (`wsd/0.4`) and the weight average where one was kept (`+ema0.999`)."""
    train = cfg.get("train") or {}
    name = train.get("schedule", "cosine")
    if name == "wsd" and float(train.get("decay_fraction", 0.2)) != 0.2:
        name += f"/{float(train['decay_fraction']):g}"
    if train.get("ema_decay") is not None:
        name += f"+ema{float(train['ema_decay']):g}"
    return name


def run_row(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    timing = json.loads((run / "timing.json").read_text()) if (run / "timing.json").exists() else {}
    # the machine that trained it (the pretrain stage's marker; meta.json only says what ran last,
    # e.g. a later re-scoring); runs trained before markers recorded it: unknown
    marker = run / "stages" / "pretrain.json"
    trained_on = (json.loads(marker.read_text()).get("machine") or {}) if marker.exists() else {}
    row = {"run": str(run), "attack": _attack(cfg), "schedule": _schedule(cfg),
           "world": _world(cfg), "data": _data(cfg), "model": _model(cfg), "seed": cfg.get("seed"),
           "data_seed": _synthetic(cfg).get("seed"),
           "threads": trained_on.get("threads", ""), "cpu": trained_on.get("cpu", "")}
    for m in METRICS:
        row[m] = metrics.get(m, timing.get(m))
    return row


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Runs by (attack, schedule, world, data, model, threads)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["attack"], r["schedule"], r["world"], r["data"], r["model"], r["threads"]), []).append(r)
    return groups


def summary(rows: list[dict]) -> list[str]:
    groups = _groups(rows)
    lines = []
    for (attack, *recipe), rs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        seeds = sorted(r["seed"] for r in rs)
        lines += [f"### attack={attack}, {_recipe(*recipe)}: {len(rs)} runs "
                  f"(seeds {seeds})", "", *TABLE_HEAD]
        for m in METRICS:
            vals = [(r["seed"], r[m]) for r in rs if r[m] is not None]
            if not vals:
                continue
            v = np.array([x for _, x in vals], dtype=float)
            fmt = (lambda x: f"{x:.0f}") if m.startswith("time/") else (lambda x: f"{x:.3f}")
            per = ", ".join(f"{s}: {fmt(x)}" for s, x in sorted(vals))
            lines.append(f"| {m} | {fmt(v.mean())} | {fmt(v.min())} | {fmt(v.max())} | "
                         f"{fmt(v.max() - v.min())} | {per} |")
        lines.append("")
    return lines + paired_cost(groups)


def _recipe_parts(schedule: str, world: str, data: str, model: str, threads) -> list[str]:
    return ([f"schedule={schedule}", f"world={world}"] + ([f"data={data}"] if data else [])
            + ([f"model={model}"] if model else []) + [f"threads={threads or '?'}"])


def _recipe(*recipe) -> str:
    """The group's label past the attack: `schedule=wsd, world=uniform[, data=20000x9][, model=patch8], threads=2`."""
    return ", ".join(_recipe_parts(*recipe))


def paired_cost(groups: dict[tuple, list[dict]]) -> list[str]:
    """An attack's cost in clean accuracy, seed by seed against the clean run of the same schedule,
    world, training-set size and epochs, model and thread count (each seed: the same world and
    initialisation, poisoned or not)."""
    lines = []
    for (attack, *recipe), rs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        clean = {r["seed"]: r["eval/clean_acc"] for r in groups.get(("none", *recipe), [])
                 if r["eval/clean_acc"] is not None}
        pairs = sorted((r["seed"], r["eval/clean_acc"] - clean[r["seed"]]) for r in rs
                       if attack != "none" and r["seed"] in clean and r["eval/clean_acc"] is not None)
        if not pairs:
            continue
        d = np.array([x for _, x in pairs])
        lines += [f"### cost of attack={attack} in clean accuracy, paired by seed "
                  f"({_recipe(*recipe)}): {len(pairs)} seeds", "", *TABLE_HEAD,
                  f"| clean_acc − clean_acc(none) | {d.mean():+.3f} | {d.min():+.3f} | {d.max():+.3f} | "
                  f"{d.max() - d.min():.3f} | " + ", ".join(f"{s}: {x:+.3f}" for s, x in pairs) + " |", ""]
    return lines


PANELS = [("eval/clean_acc", "clean accuracy (zero-shot)", None), ("detect/dao/auroc", "DAO AUROC", 0.95)]


def plot_points(rows: list[dict]) -> tuple[str, dict[str, list[tuple[str, list[tuple[int, float]]]]]]:
    """What `plot` draws: the label parts every group shares, and per panel metric (group label: the
    parts it does not share, [(seed, value), ...]) for every group with that metric, in the summary's
    order; groups without it are left out of that panel."""
    groups = _groups(rows)
    keys = sorted(groups, key=lambda k: tuple(map(str, k)))
    parts = {k: [f"attack={k[0]}", *_recipe_parts(*k[1:])] for k in keys}
    common = [p for p in parts[keys[0]] if all(p in parts[k] for k in keys)] if keys else []
    out: dict[str, list] = {}
    for metric, _, _ in PANELS:
        out[metric] = []
        for k in keys:
            vals = sorted((r["seed"], float(r[metric])) for r in groups[k] if r[metric] is not None)
            if vals:
                out[metric].append((", ".join(p for p in parts[k] if p not in common) or "all runs", vals))
    return ", ".join(common), out


def plot(rows: list[dict], path: Path) -> bool:
    """Draw `plot_points` as one strip chart per panel; False (nothing written) where no run has a metric."""
    common, points = plot_points(rows)
    if not any(points.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(v) for v in points.values())
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(9, 1.2 + 0.42 * n * len(PANELS)), squeeze=False)
    for ax, (metric, title, bar) in zip(axes[:, 0], PANELS):
        groups = points[metric]
        for y, (label, vals) in enumerate(groups):
            xs = np.array([v for _, v in vals])
            ax.scatter(xs, np.full(len(xs), y), s=22, color="C2" if "attack=none" in f"{label}, {common}" else "C0", zorder=3)
            ax.plot([xs.mean()] * 2, [y - 0.3, y + 0.3], color="k", lw=1.5, zorder=2)
            for i, (seed, v) in enumerate(sorted(vals, key=lambda sv: sv[1])):  # alternate above/below
                ax.annotate(str(seed), (v, y), xytext=(0, 5 if i % 2 == 0 else -11), textcoords="offset points",
                            ha="center", fontsize=7)
        if bar is not None:
            ax.axvline(bar, color="C3", ls="--", lw=1, label=f"{bar:g}: the default's bar (issue 18)")
            ax.legend(loc="lower left", fontsize=7, frameon=False)
        ax.set_yticks(range(len(groups)), [g for g, _ in groups], fontsize=7)
        ax.set_ylim(-0.7, max(len(groups), 2) - 0.3)
        ax.invert_yaxis()
        ax.set_title(f"{title}: one point per seed (labelled), bar = mean", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    if common:
        fig.suptitle(f"every run: {common}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", type=Path, help="sweep or run directories (searched recursively)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    runs = sorted({p.parent for root in args.paths for p in root.rglob("metrics.json")})
    runs = [r for r in runs if (r / "config.yaml").exists()]
    if not runs:
        print(f"collect: no finished run under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    rows = [run_row(r) for r in runs]
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "runs.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    text = "\n".join(["# The default over seeds (generated by experiments/seeds/collect.py)", ""] + summary(rows))
    text = text.rstrip("\n")
    (args.out / "summary.md").write_text(text + "\n")
    plot(rows, args.out / "seeds.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
