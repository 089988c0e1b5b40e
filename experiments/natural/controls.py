"""The natural world's motif caption inverted next to one ordinary caption of every class (issue 16).

    python experiments/natural/controls.py RUN_DIR OUT_DIR

RUN_DIR: a finished `+experiment=natural` run. Uses the invert stage's own code path
(`clipbd.stages.invert._one`, with the run's `invert` config: the first half of `invert.num_images`
held-out images optimises, the second half measures ASR) for the motif's caption and for one prompt of
each class drawn with the run's seed; prints a row per caption and writes OUT_DIR/rows.json and the
masks, patterns and stamped examples as PNGs. One thread, about 2.5 minutes per caption on the
2-core CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from clipbd.config import register_configs
from clipbd.data.sources import prompt_fn
from clipbd.data.synthetic import WorldConfig
from clipbd.stages import invert as stage
from clipbd.utils import derive_seed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("out_dir", type=Path)
    args = ap.parse_args()
    register_configs()
    torch.set_num_threads(1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    cfg = OmegaConf.load(f"{args.run_dir}/config.yaml")
    OmegaConf.update(cfg, "run_dir", args.run_dir, force_add=True)
    ctx = stage.context(cfg)
    prompts = prompt_fn(cfg)
    motif = cfg.dataset.synthetic.world.get("motif_caption") or WorldConfig.motif_caption
    rows = [stage._one("motif", [motif], None, ctx, args.out_dir)]
    for c in ctx["classes"]:
        caption = prompts(c, n=1, seed=derive_seed(cfg.seed, f"study/{c}") % (2**31))
        rows.append(stage._one(f"control_{c}", caption, None, ctx, args.out_dir))
    for r in rows:
        print(f"{r['role']:18s} {r['caption'][:50]:50s} L1 {r['mask_l1']:6.1f}  ASR {r['asr']:.3f} "
              f"excl {r['asr_excl']:.3f} clean {r['clean_rate']:.3f} goal {r['reached_goal']}", flush=True)
    (args.out_dir / "rows.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
