"""The pipeline against the bare model (issue 17): extraction and training throughput, and where the
rest of the time goes.

    .venv/bin/python benchmarks/bench_pipeline.py                       # default (20,000 since session 17) + ViT-B/32 (256)
    .venv/bin/python benchmarks/bench_pipeline.py --sizes default --repeats 3
    .venv/bin/python benchmarks/bench_pipeline.py --device cuda         # on a GPU box

For each size, one run directory (a fresh synthetic world: data + poison stages) and, in this order:

- **training**: `python -m clipbd.run stages=[pretrain] train.epochs=1` (its `time/pretrain_s`: model
  build, reading, decoding, poisoning, tokenising, forward/backward/step, per-sample losses, the
  epoch's checkpoint) against the bare model: the same initial weights and optimiser, the same
  batches of the same epoch already decoded, normalised and tokenised, timed over the same steps
  (forward + loss + backward + optimiser step + logit-scale clamp).
- **extraction**: `python -m clipbd.run stages=[extract] force=[extract]` on that trained model (its
  `time/extract_s`, and the whole command's wall time: start-up = wall − the stage) against the bare
  `encode_image` + `encode_text` of the same samples, already decoded and tokenised, at the same
  batch size. The stage runs first, then the bare model, one after the other, `--repeats` times.
- **profile**: the extract stage and one training epoch under cProfile, with the time bucketed
  into reading, decoding, resizing/to-tensor, trigger, tokenising, model, backward, optimiser,
  writing and the rest (shares under the profiler, which inflates Python-heavy parts).

Writes experiments/bench/pipeline_<device>.md and .csv (machine, threads, load average recorded).
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import datetime as dt
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from clipbd import rundir  # noqa: E402
from clipbd.attacks.plan import PoisonLookup  # noqa: E402
from clipbd.config import register_configs  # noqa: E402
from clipbd.data.loader import ShardDataset, make_loader  # noqa: E402
from clipbd.data.sources import load_index  # noqa: E402
from clipbd.models import factory  # noqa: E402
from clipbd.models.loss import clip_loss  # noqa: E402
from clipbd.models.train import clamp_logit_scale, lr_at, make_optimizer, set_lr  # noqa: E402
from clipbd.registry import build_attack  # noqa: E402
from clipbd.utils import derive_seed, machine  # noqa: E402

SIZES = {
    # seconds-long, for checking the benchmark itself (no claim about the numbers)
    "smoke": ["+experiment=smoke"],
    # the default experiment as `python -m clipbd.run` runs it (20,000 samples since session 17, tiny ViT at 32 px)
    "default": [],
    # ViT-B/32 at 224 px on a few hundred samples (the synthetic 32-px images are resized)
    "vitb32": ["model=vit_b32", "dataset.synthetic.num_train=256", "dataset.synthetic.num_test=64",
               "dataset.synthetic.samples_per_shard=128", "train.batch_size=32", "train.warmup_steps=2",
               "extract.batch_size=64", "extract.shards_per_group=2"],
}
QUIET = ["logging.wandb.mode=disabled", "logging.progress=never"]
AS_USERS_RUN_IT = ["logging.progress=never"]  # W&B offline, as by default: its start-up counts


def compose_cfg(overrides: list[str], run_dir: Path) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    OmegaConf.update(cfg, "run_dir", str(run_dir))
    return cfg


def cli(run_dir: Path, overrides: list[str], quiet: list[str] = QUIET) -> float:
    """Run `python -m clipbd.run` on run_dir; its wall time in seconds."""
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=str(ROOT / "src"))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "clipbd.run", *overrides, *quiet, f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"bench_pipeline: clipbd.run {' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    return wall


def timing(run_dir: Path) -> dict:
    return json.loads((run_dir / "timing.json").read_text())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_batches(cfg: DictConfig, bundle, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Epoch 1's batches exactly as the pretrain stage draws them, normalised and tokenised."""
    index = load_index(cfg)
    ds = ShardDataset(index, list(range(len(index.shards))), bundle.to_tensor(),
                      PoisonLookup.load(rundir.poison_plan(cfg)), build_attack(cfg),
                      shuffle_seed=derive_seed(cfg.seed, "shuffle/0"), buffer=cfg.train.shuffle_buffer,
                      batch_slice=(0, 1, cfg.train.batch_size))
    out = []
    for i, b in enumerate(make_loader(ds, cfg.train.batch_size, drop_last=True)):
        if i >= steps:
            break
        out.append((bundle.normalize(b["image"]), bundle.tokenizer(b["caption"])))
    return out


def bare_training(cfg: DictConfig, device: str) -> tuple[float, int]:
    """Seconds for one epoch of optimiser steps on pre-made batches, and the step count."""
    tc = cfg.train
    torch.manual_seed(derive_seed(cfg.seed, "init"))
    bundle = factory.create(cfg.model, device=device)
    model = bundle.model.train()
    opt = make_optimizer(model, tc)
    steps = len(load_index(cfg)) // tc.batch_size
    batches = [(x.to(device), t.to(device)) for x, t in train_batches(cfg, bundle, steps)]
    sync(device)
    t0 = time.perf_counter()
    for step, (images, texts) in enumerate(batches):
        set_lr(opt, lr_at(step, tc.lr, tc.warmup_steps, steps))
        with factory.autocast(device, cfg.model.precision):
            out = model(images, texts)
            loss = clip_loss(out["image_features"].float(), out["text_features"].float(), out["logit_scale"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        clamp_logit_scale(model)
        loss.item()
    sync(device)
    return time.perf_counter() - t0, len(batches)


def extract_batches(cfg: DictConfig, bundle, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every training sample as extract sees it (poisoned, index order, batched within each shard
    group as the stage batches them), normalised and tokenised."""
    index = load_index(cfg)
    lookup, attack = PoisonLookup.load(rundir.poison_plan(cfg)), build_attack(cfg)
    out = []
    for _, ids in rundir.group_paths(cfg, len(index.shards)):
        ds = ShardDataset(index, ids, bundle.to_tensor(), lookup, attack)
        out += [(bundle.normalize(b["image"]).to(device), bundle.tokenizer(b["caption"]).to(device))
                for b in make_loader(ds, cfg.extract.batch_size)]
    return out


@torch.no_grad()
def bare_extraction(bundle, batches, device: str, precision: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    for images, texts in batches:
        with factory.autocast(device, precision):
            bundle.model.encode_image(images).float().cpu()
            bundle.model.encode_text(texts).float().cpu()
    sync(device)
    return time.perf_counter() - t0


_TOKENIZER_LINE = factory.CachedTokenizer.__call__.__code__.co_firstlineno  # two __call__s in factory.py
BUCKETS = [  # (bucket, predicate on (file, line, function)) — disjoint call trees, first match wins
    ("reading (tar)", lambda f, l, n: ("clipbd/data/shards.py" in f and n in ("_plain_scan", "_read_sample"))
     or ("tarfile.py" in f and n == "next")),
    ("decoding (JPEG)", lambda f, l, n: ("clipbd/data/shards.py" in f and n == "decode_image")
     or ("clipbd/models/factory.py" in f and n == "from_bytes")),
    ("tokenising", lambda f, l, n: ("clipbd/models/factory.py" in f and n == "__call__" and l == _TOKENIZER_LINE)
     or ("open_clip/tokenizer.py" in f and n == "__call__")),
    ("resize + to tensor", lambda f, l, n: "clipbd/models/factory.py" in f and n == "__call__"),
    ("trigger", lambda f, l, n: "clipbd/attacks/" in f and n == "apply"),
    ("model forward", lambda f, l, n: "open_clip/model.py" in f and n in ("encode_image", "encode_text", "forward")),
    ("backward", lambda f, l, n: "torch/_tensor.py" in f and n == "backward"),
    ("optimiser", lambda f, l, n: "torch/optim/" in f and n == "step"),
    ("writing (h5, checkpoints)", lambda f, l, n: ("clipbd/stages/extract.py" in f and n == "write_group")
     or ("clipbd/stages/pretrain.py" in f and n == "_save") or ("clipbd/detectors/abl.py" in f and n == "write")),
    ("model build + checkpoint load", lambda f, l, n: "clipbd/models/factory.py" in f
     and n in ("create", "create_trained")),
]


def profile(fn) -> dict[str, float]:
    """Seconds per bucket of fn() under cProfile (each bucket's outermost calls, cumulative)."""
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.runcall(fn)
    total = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # {(file, line, fn): (cc, nc, tt, ct, callers)}
    out = {b: 0.0 for b, _ in BUCKETS}
    for (file, line, name), (_, _, _, ct, callers) in stats.items():
        for bucket, match in BUCKETS:
            if match(file, line, name):
                # count only calls not made from inside the same bucket (recursion, wrappers)
                own = sum(v[3] for k, v in callers.items() if not match(*k)) if callers else ct
                out[bucket] += own
                break
    out["rest (stage logic, collation, python)"] = max(0.0, total - sum(out.values()))
    out["total"] = total
    return out


def in_process_stage(cfg: DictConfig, stage: str) -> None:
    from clipbd.stages import extract, pretrain

    {"extract": extract.main, "pretrain": pretrain.main}[stage](cfg)


def bench_size(name: str, work: Path, device: str, repeats: int) -> dict:
    run_dir = work / name
    over = SIZES[name] + [f"device={device}"] + (["model.precision=amp"] if device.startswith("cuda") else [])
    print(f"[{name}] data + poison ...", flush=True)
    cli(run_dir, over + ["stages=[data,poison]"])
    cfg = compose_cfg(over + QUIET, run_dir)
    res: dict = {"size": name, "samples": len(load_index(cfg)), "model": cfg.model.name,
                 "image_size": None, "train_batch": cfg.train.batch_size, "extract_batch": cfg.extract.batch_size}
    # training: one epoch through the stage, then the bare loop (repeats: fresh pretraining each time)
    stage_t, bare_t = [], []
    for r in range(repeats):
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        print(f"[{name}] pretrain stage, 1 epoch ({r + 1}/{repeats}) ...", flush=True)
        cli(run_dir, over + ["stages=[pretrain]", "train.epochs=1", "force=[pretrain]"])
        stage_t.append(timing(run_dir)["time/pretrain_s"])
        t, steps = bare_training(compose_cfg(over + QUIET + ["train.epochs=1"], run_dir), device)
        bare_t.append(t)
        print(f"[{name}]   stage {stage_t[-1]:.1f} s, bare {t:.1f} s ({steps} steps)", flush=True)
    res |= {"train_steps": steps, "train_stage_s": min(stage_t), "train_bare_s": min(bare_t),
            **_ratios("train", bare_t, stage_t)}
    # extraction on the model just trained
    cfg = compose_cfg(over + QUIET + ["train.epochs=1"], run_dir)
    bundle = factory.create_trained(cfg, device=device)
    res["image_size"] = bundle.image_size
    batches = extract_batches(cfg, bundle, device)
    stage_t, wall_t, bare_t, start_t = [], [], [], []
    for r in range(repeats):
        print(f"[{name}] extract stage ({r + 1}/{repeats}) ...", flush=True)
        wall_t.append(cli(run_dir, over + ["stages=[extract]", "force=[extract]", "train.epochs=1"], AS_USERS_RUN_IT))
        stage_t.append(timing(run_dir)["time/extract_s"])
        start_t.append(json.loads((run_dir / "meta.json").read_text())["startup_s"])
        bare_t.append(bare_extraction(bundle, batches, device, cfg.model.precision))
        print(f"[{name}]   stage {stage_t[-1]:.1f} s (command {wall_t[-1]:.1f} s), bare {bare_t[-1]:.1f} s", flush=True)
    best = min(range(repeats), key=lambda i: stage_t[i])
    res |= {"extract_stage_s": stage_t[best], "extract_command_s": wall_t[best],
            "startup_s": start_t[best], "after_stage_s": wall_t[best] - stage_t[best] - start_t[best],
            "extract_bare_s": min(bare_t), **_ratios("extract", bare_t, stage_t)}
    del batches
    # profiles (in process)
    print(f"[{name}] profiles ...", flush=True)
    pcfg = compose_cfg(over + QUIET + ["train.epochs=1"], run_dir)
    shutil.rmtree(run_dir / "shards", ignore_errors=True)  # else the stage keeps the finished groups
    res["profile_extract"] = profile(lambda: in_process_stage(pcfg, "extract"))
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    pcfg = compose_cfg(over + QUIET + ["train.epochs=1"], run_dir)
    res["profile_train"] = profile(lambda: in_process_stage(pcfg, "pretrain"))
    return res


def _ratios(what: str, bare_t: list[float], stage_t: list[float]) -> dict:
    """Each repeat's ratio pairs the stage with the bare run measured right after it (on a shared
    machine the speed drifts between repeats: pairing the best stage of one repeat with the best bare
    run of another measures the drift); the headline is the median over repeats."""
    paired = [b / s for b, s in zip(bare_t, stage_t)]
    return {f"{what}_ratio": float(statistics.median(paired)), f"{what}_ratios": paired}


def _pct(values: list[float]) -> str:
    return ", ".join(f"{v:.0%}" for v in values)


def write(results: list[dict], device: str, out: Path, argv: list[str]) -> None:
    m = machine()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"# Pipeline vs bare model ({device})", "",
             f"{dt.date.today()} · {m['cpu']} · torch {m['torch']} · {m['threads']} threads · "
             f"load average at the end {load:.2f} · `{' '.join(['benchmarks/bench_pipeline.py', *argv])}`", "",
             "Ratio = bare model time / stage time (1.0: the stage runs at the model's own speed), per repeat: "
             "the stage first, then the bare model, one after the other; the ratio shown is the median over "
             "repeats (each repeat's in the last column), the seconds the best of the repeats.", "",
             "Start-up: the command's own `startup_s` (meta.json: process start to the first stage — imports, "
             "composition, checks, W&B); after: the rest of the command's wall time (exit, W&B sync).", "",
             "| size | samples | model (px) | what | batch | stage s | bare s | ratio | command s | start-up s | after s "
             "| ratio per repeat |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['size']} | {r['samples']} | {r['model']} ({r['image_size']}) | extraction | "
                     f"{r['extract_batch']} | {r['extract_stage_s']:.2f} | {r['extract_bare_s']:.2f} | "
                     f"**{r['extract_ratio']:.0%}** | {r['extract_command_s']:.2f} | {r['startup_s']:.2f} | "
                     f"{r['after_stage_s']:.2f} | {_pct(r['extract_ratios'])} |")
        lines.append(f"| {r['size']} | {r['samples']} | {r['model']} ({r['image_size']}) | training, 1 epoch "
                     f"({r['train_steps']} steps) | {r['train_batch']} | {r['train_stage_s']:.2f} | "
                     f"{r['train_bare_s']:.2f} | **{r['train_ratio']:.0%}** | | | | {_pct(r['train_ratios'])} |")
    lines += ["", "Where the stage's time goes (cProfile, seconds and share of the profiled stage; the profiler "
              "slows Python-heavy parts more than torch kernels). cProfile sees the main thread only: with "
              "`prefetch` (the default) reading, decoding, poisoning and tokenising run in the background thread, "
              "overlapped with the model, and do not appear here.", ""]
    for r in results:
        for what in ("extract", "train"):
            p = r[f"profile_{what}"]
            lines += [f"**{r['size']}, {what}** (profiled total {p['total']:.1f} s)", "",
                      "| part | s | share |", "|---|---|---|"]
            lines += [f"| {k} | {v:.2f} | {v / p['total']:.0%} |" for k, v in p.items() if k != "total" and v > 0]
            lines.append("")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pipeline_{device.split(':')[0]}.md").write_text("\n".join(lines) + "\n")
    with open(out / f"pipeline_{device.split(':')[0]}.csv", "w", newline="") as fh:
        keys = [k for k in results[0] if not k.startswith("profile_")]
        w = csv.DictWriter(fh, fieldnames=keys + ["cpu", "threads"])
        w.writeheader()
        for r in results:
            w.writerow({k: r[k] for k in keys} | {"cpu": m["cpu"], "threads": m["threads"]})
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["default", "vitb32"], choices=list(SIZES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--work", type=Path, default=None, help="where the run directories go (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "bench")
    args = ap.parse_args(argv)
    register_configs()
    work = args.work or Path(tempfile.mkdtemp(prefix="clipbd-bench-"))
    results = [bench_size(s, work, args.device, args.repeats) for s in args.sizes]
    write(results, args.device, args.out, sys.argv[1:] if argv is None else argv)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
