"""One training step of the tiny ViT by vision patch size and AdamW kernel (issue 18, session 17):
what a default's step costs, so a recipe's steps can be priced before it is trained.

    .venv/bin/python benchmarks/bench_step.py                     # 2 threads, 30 steps per variant
    .venv/bin/python benchmarks/bench_step.py --threads 1 --steps 50

Each variant: the model of conf/model/tiny_vit.yaml with one vision setting changed, random 32 px
images and 16-token captions at the default's batch (64), the CLIP loss, backward and the AdamW
step as `clipbd.models.train.make_optimizer` builds it (fused) or torch's foreach kernel; forward,
backward and optimiser timed apart, median over the steps after 5 warm-up steps.
Writes experiments/bench/step_<cpu>_<threads>t.md and .csv (machine, threads, load average).
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

import open_clip
import torch
import yaml
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from clipbd.models.loss import clip_loss  # noqa: E402
from clipbd.models.train import make_optimizer, param_groups  # noqa: E402
from clipbd.utils import machine  # noqa: E402

TRAIN = OmegaConf.create({"lr": 1e-3, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.98, "eps": 1e-6})

VARIANTS = [  # name, vision_cfg changes, optimiser kernel
    ("8x8 patches (default since session 17)", {}, "fused"),
    ("8x8 patches, foreach AdamW", {}, "foreach"),
    ("4x4 patches (default through session 16)", {"patch_size": 4}, "fused"),
    ("4x4 patches, foreach AdamW (session 16's step)", {"patch_size": 4}, "foreach"),
    ("4x4 patches, 3 layers", {"patch_size": 4, "layers": 3}, "fused"),
    ("8x8 patches, width 192", {"width": 192}, "fused"),
    ("8x8 patches, 6 layers", {"layers": 6}, "fused"),
]


def time_variant(arch: dict, kernel: str, steps: int, batch: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**arch)
    if kernel == "fused":  # what the pretrain stage builds
        opt = make_optimizer(model, TRAIN)
    else:  # the same groups and settings with torch's foreach kernel (session 16's optimiser)
        opt = torch.optim.AdamW(param_groups(model, TRAIN.weight_decay), lr=TRAIN.lr, betas=(TRAIN.beta1, TRAIN.beta2),
                                eps=TRAIN.eps, foreach=True)
    size, ctx = arch["vision_cfg"]["image_size"], arch["text_cfg"]["context_length"]
    images, texts = torch.randn(batch, 3, size, size), torch.randint(0, 49408, (batch, ctx))
    parts: dict[str, list[float]] = {"forward": [], "backward": [], "optimiser": []}
    for i in range(steps + 5):
        t0 = time.perf_counter()
        img, txt, scale = model(images, texts)
        loss = clip_loss(img, txt, scale)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if i >= 5:
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
                parts[k].append(v)
    out = {k: statistics.median(v) * 1000 for k, v in parts.items()}
    out["step"] = statistics.median([a + b + c for a, b, c in zip(*parts.values())]) * 1000
    out["vision_params_M"] = sum(p.numel() for p in model.visual.parameters()) / 1e6
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "bench")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = yaml.safe_load((ROOT / "conf" / "model" / "tiny_vit.yaml").read_text())["arch"]
    rows = []
    for name, change, kernel in VARIANTS:
        arch = copy.deepcopy(base)
        arch["vision_cfg"].update(change)
        r = time_variant(arch, kernel, args.steps, args.batch)
        rows.append({"variant": name, "adamw": kernel, **{k: round(v, 2) for k, v in r.items()}})
        print(f"{name:50s} step {r['step']:7.1f} ms  (forward {r['forward']:.1f}, backward {r['backward']:.1f}, "
              f"optimiser {r['optimiser']:.1f})", flush=True)
    m = machine()
    cpu = m.get("cpu", "cpu").split()[0].lower()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"step_{cpu}_{args.threads}t"
    with open(stem.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    default = rows[0]["step"]
    lines = [f"# One training step of the tiny ViT ({args.threads} thread{'s' * (args.threads > 1)})", "",
             f"{dt.date.today()} · {m.get('cpu')} · torch {torch.__version__} · {args.threads} thread{'s' * (args.threads > 1)} · "
             f"batch {args.batch} · median of {args.steps} steps · load average at the end "
             f"{os.getloadavg()[0]:.2f} · `benchmarks/bench_step.py --threads {args.threads} --steps {args.steps}`", "",
             "| variant | AdamW | step ms | forward | backward | optimiser | vs default | vision params (M) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['adamw']} | {r['step']:.1f} | {r['forward']:.1f} | {r['backward']:.1f} | "
                     f"{r['optimiser']:.1f} | {r['step'] / default:.2f}x | {r['vision_params_M']:.2f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
