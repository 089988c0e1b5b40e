#!/usr/bin/env python
"""Every trained run's model on every run's held-out split: separates how hard a seed's test set is
from how good its model is (the seeds draw new worlds, test sets included).

    python experiments/default/cross_eval.py /work/runs/wsd_s0 /work/runs/w2_s1 [RUN ...]

Prints one line per (model, test set) with the zero-shot clean accuracy, then the table as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from clipbd.models import factory
from clipbd.models.evaluation import evaluate_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished run directories (config.yaml, checkpoints/latest.pt, data/)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = {}
    for model_run in args.runs:
        cfg = OmegaConf.load(model_run / "config.yaml")
        bundle = factory.create_trained(cfg, "cpu")
        for test_run in args.runs:
            OmegaConf.update(cfg, "dataset.test_shards", str(test_run / "data" / "test-*.tar"))
            acc = evaluate_model(cfg, bundle, None, "cpu")["eval/clean_acc"]  # clean accuracy only: no triggers
            table[f"{model_run.name} on {test_run.name}"] = acc
            print(f"{model_run.name} on {test_run.name}: {acc:.4f}", flush=True)
    print(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
