#!/usr/bin/env python
"""Zero-shot clean accuracy of finished runs on a larger held-out split of their own world (issue 18:
how much of the seed-to-seed spread is the 2,000-image test split's sampling error?).

A synthetic sample is drawn from its own generator, keyed by (seed, split, index), so the first
2,000 images of a 10,000-image test split are the 2,000 the run was evaluated on: the larger split
extends the run's own, and this script checks that byte for byte before it evaluates. The weights
are the run's `checkpoints/latest.pt`; the classifier and the trigger are the evaluate stage's own
(clipbd.models.evaluation.evaluate_model), so a run made with `dataset.synthetic.num_test=N`
reports what this prints for N.

    python experiments/default/heldout_size.py /work/runs/RUN [RUN ...] --num-test 10000 \\
        --out experiments/seeds/session18/heldout10k.csv

Prints one line per run; --out writes CSV (run, seed, attack, n, clean_acc, asr, and the same at
the run's own split size, which must equal its metrics.json).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from clipbd.data.synthetic import world_from_dict, write_split
from clipbd.models import factory
from clipbd.models.evaluation import evaluate_model
from clipbd.registry import build_attack
from clipbd.utils import read_json, write_csv


def _sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def heldout(cfg, root: Path, n: int) -> tuple[list[str], list[str]]:
    """(the run's own test shards, its split extended to n images: written once per world seed under
    root and checked to begin with the run's own, byte for byte)."""
    syn = cfg.dataset.synthetic
    world = world_from_dict(OmegaConf.to_container(syn.world, resolve=True))
    shards = write_split(root / f"seed{syn.seed}_{n}", "test", n, syn.samples_per_shard, syn.seed + 1, world)
    own = read_json(Path(cfg.run_dir) / "data.json")["test_shards"]
    for mine, theirs in zip(shards, own):
        if _sha(mine) != _sha(theirs):
            raise SystemExit(f"{theirs}: not a prefix of the regenerated split ({mine}); other generator?")
    return own, shards


def _evaluate(cfg, bundle, attack, shards: list[str]) -> tuple[float, float | str]:
    """(clean accuracy, ASR or "" without an attack) on `shards`, as the evaluate stage computes them."""
    OmegaConf.update(cfg, "dataset.test_shards", list(shards))
    m = evaluate_model(cfg, bundle, attack, "cpu")
    return m["eval/clean_acc"], m.get("attack/asr", "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished run directories (config.yaml, checkpoints/, data.json)")
    ap.add_argument("--num-test", type=int, default=10_000, help="held-out images to evaluate on")
    ap.add_argument("--cache", type=Path, default=None, help="where the larger splits are written (a temp dir)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write the results as CSV here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = args.cache or Path(tempfile.mkdtemp(prefix="heldout_"))
    rows = []
    for run in args.runs:
        cfg = OmegaConf.load(run / "config.yaml")
        OmegaConf.update(cfg, "run_dir", str(run))
        recorded = read_json(run / "metrics.json")
        own, shards = heldout(cfg, cache, args.num_test)
        own_n = cfg.dataset.synthetic.num_test
        bundle = factory.create_trained(cfg, "cpu")
        attack = build_attack(cfg)
        name = str(cfg.attack.get("_target_") or "none").rsplit(".", 1)[-1]
        row = {"run": run.name, "seed": cfg.seed, "attack": name, "n": args.num_test}
        row["clean_acc_own"], row["asr_own"] = _evaluate(cfg, bundle, attack, own)
        row["clean_acc"], row["asr"] = _evaluate(cfg, bundle, attack, shards)
        if abs(row["clean_acc_own"] - recorded["eval/clean_acc"]) > 1e-9:
            raise SystemExit(f"{run}: {own_n}-image accuracy {row['clean_acc_own']} is not the recorded "
                             f"{recorded['eval/clean_acc']} (other weights or classifier?)")
        rows.append(row)
        print(f"{run.name}: seed {cfg.seed} {name}: clean {row['clean_acc_own']:.4f} on {own_n} -> "
              f"{row['clean_acc']:.4f} on {args.num_test}" + (f", ASR {row['asr']:.4f}" if row["asr"] != "" else ""),
              flush=True)
    if args.out:
        write_csv(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
