#!/usr/bin/env python
"""Zero-shot clean accuracy of averaged weights of finished runs (issue 18: does averaging the end of a
trajectory narrow the seed-to-seed spread?).

For each run directory: the last epoch's raw weights, the run's own exponential moving average (when
it was trained with `train.ema_decay`), and the uniform average of the raw weights of the last K
epoch checkpoints (`checkpoints/epoch_N.pt`, K from --last), all evaluated by the evaluate stage's
own zero-shot classifier on the run's held-out split; --curve adds every epoch checkpoint's raw
weights (the learning curve).

    python experiments/default/averaging.py /work/runs/ud_clean_s1 /work/runs/ud_clean_s3 --last 2 3 \\
        --out experiments/default/averaging.csv

Prints one line per (run, weights); --out writes them as CSV (run, seed, weights, clean_acc).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from clipbd.models import factory
from clipbd.models.evaluation import evaluate_model
from clipbd.utils import write_csv


def _epochs(run: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in (run / "checkpoints").glob("epoch_*.pt")
             if (m := re.fullmatch(r"epoch_(\d+)\.pt", p.name))]
    return [p for _, p in sorted(found)]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def variants(run: Path, last: list[int], curve: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """{label: state dict} of the weights to compare for one run."""
    epochs = _epochs(run)
    if not epochs:
        raise SystemExit(f"{run}: no checkpoints/epoch_N.pt (train with train.checkpoint_every=1)")
    final = _load(epochs[-1])
    out = {f"raw {p.stem}": _load(p)["model"] for p in epochs[:-1]} if curve else {}
    out["raw"] = final["model"]
    if isinstance(final.get("ema"), dict):
        out[f"ema {final['ema']['decay']}"] = final["ema"]["weights"]
    for k in last:
        if k > len(epochs):
            print(f"{run.name}: only {len(epochs)} epoch checkpoints, skipping the last-{k} average", file=sys.stderr)
            continue
        sds = [final["model"]] + [_load(p)["model"] for p in epochs[-k:-1]]
        out[f"mean of last {k} epochs"] = {
            name: (torch.stack([sd[name].float() for sd in sds]).mean(0) if v.dtype.is_floating_point else v)
            for name, v in final["model"].items()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished run directories (config.yaml, checkpoints/, data/)")
    ap.add_argument("--last", nargs="*", type=int, default=[2, 3], help="average the last K epoch checkpoints")
    ap.add_argument("--curve", action="store_true", help="every epoch checkpoint's raw weights too")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="write the results as CSV here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for run in args.runs:
        cfg = OmegaConf.load(run / "config.yaml")
        bundle = factory.create_trained(cfg, "cpu")
        for label, sd in variants(run, args.last, args.curve).items():
            bundle.model.load_state_dict(sd)
            acc = evaluate_model(cfg, bundle, None, "cpu")["eval/clean_acc"]  # clean accuracy only
            rows.append({"run": run.name, "seed": cfg.seed, "weights": label, "clean_acc": round(acc, 4)})
            print(f"{run.name} (seed {cfg.seed}) {label}: {acc:.4f}", flush=True)
    if args.out:
        write_csv(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
