#!/usr/bin/env python
"""Per-class zero-shot accuracy and prediction counts of finished runs (clean test images).

    python experiments/attacks/per_class.py multirun/attacks/a/0 outputs/default

Uses each run's own config, checkpoint (`checkpoints/latest.pt`), prompts and test shards, exactly as
the evaluate stage does; prints one line per run: overall accuracy, accuracy per class (with the
number of test images of that class) and how many test images were predicted as each class. It shows
whether a class embedding has become a hub that attracts other classes' images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from clipbd.data.loader import ShardDataset, make_loader
from clipbd.data.shards import build_index
from clipbd.data.sources import class_names, prompt_fn, test_shards
from clipbd.models import factory
from clipbd.models import evaluation as ev
from clipbd.utils import derive_seed


def per_class(run: Path) -> str:
    cfg = OmegaConf.load(run / "config.yaml")
    cfg.run_dir = str(run)
    cfg.model.checkpoint = str(run / "checkpoints" / "latest.pt")
    bundle = factory.create(cfg.model, device="cpu")
    bundle.model.eval()
    classes, prompts = class_names(cfg), prompt_fn(cfg)
    seed = derive_seed(cfg.seed, "zeroshot") % (2**31)
    with torch.no_grad():
        emb = ev.class_embeddings(bundle.model, bundle.tokenizer,
                                  [prompts(c, n=cfg.eval.prompts_per_class, seed=seed) for c in classes], "cpu")
        shards = test_shards(cfg)
        ds = ShardDataset(build_index(shards, progress=False), range(len(shards)), bundle.to_tensor(),
                          label_key=cfg.dataset.label_key)
        pred, _, lab = ev.predict(bundle, make_loader(ds, 256), emb, "cpu")
    cols = " ".join(f"{c} {(pred[lab == i] == i).mean():.2f} (n={(lab == i).sum()})" for i, c in enumerate(classes))
    counts = " ".join(f"{c} {n}" for c, n in zip(classes, np.bincount(pred, minlength=len(classes))))
    return f"{run}: acc {(pred == lab).mean():.4f} | per class: {cols}\n  predicted: {counts}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+", help="finished run directories")
    a = p.parse_args(argv)
    for run in a.runs:
        if not (run / "checkpoints" / "latest.pt").exists():
            print(f"per_class.py: {run} has no checkpoints/latest.pt", file=sys.stderr)
            return 2
        print(per_class(run), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
