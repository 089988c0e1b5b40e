#!/usr/bin/env python
"""One PNG grid of every attack's trigger: a clean held-out image, the same image with the attack's
test-time trigger (the one ASR is measured with), and the amplified difference.

    python experiments/attacks/grid.py outputs/attack_grid/* --out experiments/attacks/triggers.png

Each argument is a run directory with a poison plan (any run of stages data, poison): the attack is
rebuilt from its config.yaml and bound to its poison_plan.json, exactly as the pipeline's stages
do, so the picture shows the trigger that run used. Multi-trigger runs show one column per member.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from clipbd.data.shards import decode_image, iter_shard
from clipbd.registry import build_attack

ZOOM = 4  # 32 px images drawn at 128 px (nearest neighbour: pixels stay visible)
AMPLIFY = 4


def load_attack(run: Path):
    cfg = OmegaConf.load(run / "config.yaml")
    OmegaConf.update(cfg, "run_dir", str(run.resolve()), merge=False)  # the run may have moved
    return cfg, build_attack(cfg)


def clean_image(run: Path, cfg, avoid_label: int) -> torch.Tensor:
    """The first held-out image not of the target class, at the model's resolution."""
    from clipbd.models import factory

    to_tensor = factory.create(cfg.model).to_tensor()
    for path in json.loads((run / "data.json").read_text())["test_shards"]:
        for s in iter_shard(path):
            if int(s.meta.get(cfg.dataset.label_key, -1)) != avoid_label:
                return to_tensor(decode_image(s))
    raise SystemExit(f"grid: no held-out image outside the target class in {run}")


def columns(runs: list[Path]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    from clipbd.data.sources import class_names

    out = []
    for run in runs:
        cfg, attack = load_attack(run)
        if attack is None:
            continue
        tests = attack.test_triggers()
        img = clean_image(run, cfg, class_names(cfg).index(next(iter(tests.values()))[1]))
        for name, (fn, target) in tests.items():
            label = attack.name if len(tests) == 1 else f"{attack.name}:{name}"
            out.append((f"{label}\n→ {target}", img, fn(img)))
    return out


def draw(cols, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(cols), figsize=(1.45 * len(cols), 4.9), squeeze=False)
    show = lambda t: np.kron(t.permute(1, 2, 0).numpy(), np.ones((ZOOM, ZOOM, 1)))  # noqa: E731
    for j, (title, clean, trig) in enumerate(cols):
        diff = ((trig - clean).abs() * AMPLIFY).clamp(0, 1)
        for i, (im, row) in enumerate(((clean, "clean"), (trig, "triggered"), (diff, f"|Δ|×{AMPLIFY}"))):
            ax = axes[i, j]
            ax.imshow(show(im), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(row, fontsize=8)
        axes[0, j].set_title(title, fontsize=7)
    fig.suptitle("test-time triggers (clipbd attacks; synthetic data, 32 px)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories holding poison_plan.json")
    ap.add_argument("--out", type=Path, default=Path("experiments/attacks/triggers.png"))
    args = ap.parse_args(argv)
    runs = [r for r in args.runs if (r / "poison_plan.json").exists()]
    if not runs:
        print("grid: none of the given directories holds a poison_plan.json", file=sys.stderr)
        return 2
    with torch.no_grad():
        cols = columns(runs)
    draw(cols, args.out)
    print(f"grid: {len(cols)} triggers -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
