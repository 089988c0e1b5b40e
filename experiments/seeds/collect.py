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
Writes `<out>/runs.csv` (one row per run) and `<out>/summary.md`.
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


def summary(rows: list[dict]) -> list[str]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["attack"], r["schedule"], r["world"], r["data"], r["model"], r["threads"]), []).append(r)
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


def _recipe(schedule: str, world: str, data: str, model: str, threads) -> str:
    """The group's label past the attack: `schedule=wsd, world=uniform[, data=20000x9][, model=patch8], threads=2`."""
    return (f"schedule={schedule}, world={world}" + (f", data={data}" if data else "")
            + (f", model={model}" if model else "") + f", threads={threads or '?'}")


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
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
