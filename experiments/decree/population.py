#!/usr/bin/env python
"""DECREE over a population of clipbd's own encoders: the table, AUROC and trigger figure of
experiments/decree/README.md. Regenerate (one thread, as measured):

    OMP_NUM_THREADS=1 PYTHONPATH=src python experiments/decree/population.py \
        --runs /work/runs --work /tmp/decree_pop --reference bn_s0 clean_s0

For every encoder whose source exists: copy its run directory (without checkpoints/epoch_*.pt,
data/ or wandb/) into --work, run the `decree` stage there with the overrides it was trained
with (`python -m clipbd.run hydra.run.dir=<copy> stages=[decree] ...`), and with --reference also
the published loop (experiments/decree/published.py) on the same encoder and shadow set. Encoder
attacks (text-target, BadEncoder) are made from a clean run's checkpoint with
`python -m clipbd.attacks.encoder` first. Finished steps are kept: a re-run only collects.
Writes results.csv, results.md and triggers.png next to this file (or --out).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

# name: (label 1 = backdoored, kind, source run, overrides of the decree stage[, checkpoint in the run])
ENCODERS = {
    "bn_s0": (1, "badnets", "bn_s0", []),
    # seeds 1-4: the default's seed changes its world too (dataset.synthetic.seed = 1234 + seed)
    **{f"bn_s{s}": (1, "badnets", f"bn_s{s}", [f"seed={s}"]) for s in (1, 2, 3, 4)},
    "clean_s0": (0, "none", "clean_s0", ["attack=none"]),
    **{f"clean_s{s}": (0, "none", f"clean_s{s}", ["attack=none", f"seed={s}"]) for s in (1, 2, 3, 4)},
    # encoder attacks on clean_s0's encoder, trigger: the BadNets patch at its test position
    "text_target_s0": (1, "text_target", "clean_s0", ["attack.poison_rate=0"]),
    "badencoder_s0": (1, "badencoder", "clean_s0", ["attack.poison_rate=0"]),
    # a global trigger: clean_s0 fine-tuned on Blend-poisoned data (30%, 3 epochs; the decomposition
    # study's recipe, experiments/decompose/README.md section 3). Run dir made by:
    #   python -m clipbd.run hydra.run.dir=/work/runs/blend_ft_s0 stages=[data,poison,pretrain,evaluate] \
    #     attack=blend attack.poison_rate=0.3 train.init_checkpoint=/work/runs/clean_s0/checkpoints/latest.pt \
    #     train.epochs=3 train.lr=5e-4 train.warmup_steps=30
    "blend_ft_s0": (1, "blend", "blend_ft_s0", [
        "attack=blend", "attack.poison_rate=0.3", "train.init_checkpoint=/work/runs/clean_s0/checkpoints/latest.pt",
        "train.epochs=3", "train.lr=5e-4", "train.warmup_steps=30"]),
    # BadCLIP's optimised patch (8 px, against clean_s0 as the surrogate), the same fine-tune
    "badclip_ft_s0": (1, "badclip", "badclip_ft_s0", [
        "attack=badclip", "attack.patch_size=8", "attack.surrogate=/work/runs/clean_s0/checkpoints/latest.pt",
        "attack.poison_rate=0.3", "train.init_checkpoint=/work/runs/clean_s0/checkpoints/latest.pt",
        "train.epochs=3", "train.lr=5e-4", "train.warmup_steps=30"]),
    # earlier checkpoints of the same runs (not independent encoders: a supplementary population)
    **{f"bn_s0_e{e}": (1, "badnets", "bn_s0", [], f"checkpoints/epoch_{e}.pt") for e in (12, 15)},
    **{f"clean_s0_e{e}": (0, "none", "clean_s0", ["attack=none"], f"checkpoints/epoch_{e}.pt") for e in (12, 15)},
}
ENCODER_ATTACKS = {"text_target": "encoder_text_target", "badencoder": "encoder_badencoder"}


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                WANDB_MODE="offline", WANDB_SILENT="true")


def _clipbd(module: str, *args: str) -> None:
    cmd = [sys.executable, "-m", module, *args]
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")


def prepare(runs: Path, work: Path, name: str) -> Path | None:
    label, kind, source, _, *ckpt = ENCODERS[name]
    src = runs / source
    done = (src / ckpt[0]).exists() if ckpt else (src / "stages" / "pretrain.json").exists()
    if not done:  # a named epoch checkpoint, or finished pretraining (then latest.pt is final)
        return None
    dst = work / name
    if ckpt:  # another checkpoint of the run: a fresh dir with the run's data manifest and plan
        dst.mkdir(parents=True, exist_ok=True)
        for f in ("data.json", "poison_plan.json"):
            shutil.copy(src / f, dst / f)
        (dst / "checkpoint.txt").write_text(str(src / ckpt[0]) + "\n")
        return dst
    if kind in ENCODER_ATTACKS:
        ckpt = dst / "encoder_attack" / f"{kind}.pt"
        if not ckpt.exists():
            _clipbd("clipbd.attacks.encoder", f"+experiment={ENCODER_ATTACKS[kind]}", f"hydra.run.dir={dst}",
                    f"model.checkpoint={src / 'checkpoints' / 'latest.pt'}", "stages=[data,poison]")
        return dst
    if not dst.exists():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("epoch_*.pt", "data", "wandb", "wandb_id.txt", "sample_loss", "shards", "scores.h5"))
    return dst


def run_decree(run_dir: Path, name: str) -> dict:
    label, kind, _, overrides, *_ = ENCODERS[name]
    ckpt = checkpoint_of(run_dir, name)
    extra = [] if ckpt == run_dir / "checkpoints" / "latest.pt" else [f"model.checkpoint={ckpt}"]
    _clipbd("clipbd.run", f"hydra.run.dir={run_dir}", "stages=[decree]", *overrides, *extra)
    return json.loads((run_dir / "decree" / "result.json").read_text())


def checkpoint_of(run_dir: Path, name: str) -> Path:
    kind = ENCODERS[name][1]
    if (run_dir / "checkpoint.txt").exists():
        return Path((run_dir / "checkpoint.txt").read_text().strip())
    return run_dir / "encoder_attack" / f"{kind}.pt" if kind in ENCODER_ATTACKS else run_dir / "checkpoints" / "latest.pt"


def _model_node(ckpt: Path):
    """The model config a clipbd checkpoint names (its architecture is recorded in it)."""
    from omegaconf import OmegaConf

    from clipbd.models import factory

    meta = factory.read_checkpoint(ckpt)
    return OmegaConf.create({"name": meta["name"], "arch": meta["arch"], "checkpoint": None})


def run_reference(run_dir: Path, name: str, shadow_size: int, normalization: str,
                  time_limit_s: float | None = None) -> dict:
    """The published loop on the same encoder and shadow set (cached in reference_<norm>.json)."""
    path = run_dir / f"reference_{normalization}.json"
    if path.exists():
        return json.loads(path.read_text())
    import torch
    from omegaconf import OmegaConf
    from published import published_decree

    from clipbd.data.loader import read_images
    from clipbd.inspect.decree import normalisation
    from clipbd.models import factory

    torch.set_num_threads(int(_env()["OMP_NUM_THREADS"]))
    bundle = factory.create(_model_node(checkpoint_of(run_dir, name)),
                            checkpoint=checkpoint_of(run_dir, name))
    bundle.model.eval()
    for p in bundle.model.parameters():
        p.requires_grad_(False)
    shards = json.loads((run_dir / "data.json").read_text())["test_shards"]
    shadow = read_images(shards, bundle.to_tensor(), shadow_size)
    mean, std = normalisation(normalization, bundle.mean, bundle.std)
    print(f"+ published loop on {name} ({len(shadow)} images, {normalization})", flush=True)
    ref = published_decree(bundle.model.visual, shadow, mean, std, time_limit_s=time_limit_s) | {
        "normalization": normalization, "time_limit_s": time_limit_s}
    path.write_text(json.dumps(ref, indent=2) + "\n")
    return ref


def target_shares(run_dir: Path, name: str, target: str = "banana") -> dict:
    """Zero-shot share of held-out images (test images 1000-1999: not the shadow set) classified as
    the attack's target class: clean, stamped with the inverted trigger (8-bit PNGs), and with the
    true test trigger (the BadNets patch; for a Blend or BadCLIP run its own, bound to its plan). Tells
    whether the inverted trigger is the backdoor or just a collapse."""
    path = run_dir / "target_shares.json"
    if path.exists():
        return json.loads(path.read_text())
    import numpy as np
    import torch
    import torch.nn.functional as F
    from omegaconf import OmegaConf
    from PIL import Image

    from clipbd.attacks.badnets import BadNets
    from clipbd.data.loader import read_images
    from clipbd.data.sources import class_names, prompt_fn
    from clipbd.inspect.decree import stamp
    from clipbd.models import factory
    from clipbd.models.zeroshot import class_embeddings
    from clipbd.utils import derive_seed

    cfg = OmegaConf.load(run_dir / "config.yaml")
    bundle = factory.create(_model_node(checkpoint_of(run_dir, name)),
                            checkpoint=checkpoint_of(run_dir, name))
    model = bundle.model.eval()
    classes = class_names(cfg)
    seed = derive_seed(cfg.seed, "zeroshot") % (2**31)
    with torch.no_grad():
        emb = class_embeddings(model, bundle.tokenizer, [prompt_fn(cfg)(c, n=64, seed=seed) for c in classes])
        shards = json.loads((run_dir / "data.json").read_text())["test_shards"]
        x = read_images(shards, bundle.to_tensor(), 2000)[1000:]
        mask = torch.from_numpy(np.asarray(Image.open(run_dir / "decree" / "mask.png"), dtype=np.float32) / 255)
        pattern = torch.from_numpy(np.asarray(Image.open(run_dir / "decree" / "pattern.png"), dtype=np.float32) / 255)
        if ENCODERS[name][1] in ("blend", "badclip"):  # the run's own trigger, bound to its plan
            from clipbd.stages.decree import _attack

            OmegaConf.update(cfg, "run_dir", str(run_dir), force_add=True)
            attack = _attack(cfg)
            true = torch.stack([attack.apply_test(img) for img in x])
        else:
            true = BadNets(patch_size=8, grid=4).stamp(x, (1.0, 1.0))
        share = lambda imgs: float((  # noqa: E731
            (F.normalize(model.encode_image(bundle.normalize(imgs)), dim=-1) @ emb.T).argmax(1)
            == classes.index(target)).float().mean())
        out = {"target_clean": share(x), "target_inverted": share(stamp(x, mask, pattern.permute(2, 0, 1))),
               "target_true": share(true)}
    path.write_text(json.dumps(out, indent=2) + "\n")
    return out


def collect(rows: list[dict], out: Path) -> None:
    from clipbd.inspect.decree import calibrated_threshold

    clean = {r["encoder"]: r["pl1"] for r in rows if r["label"] == 0}
    thr_all = calibrated_threshold(list(clean.values())) if clean else None
    for r in rows:  # a clean encoder is judged by a threshold from the *other* clean encoders
        others = [v for k, v in clean.items() if k != r["encoder"]]
        thr = calibrated_threshold(others) if others else None
        r["threshold_calibrated"] = thr
        r["verdict_calibrated"] = None if thr is None else r["pl1"] < thr
    auroc = None
    labels = [r["label"] for r in rows]
    if 0 < sum(labels) < len(labels):
        from sklearn.metrics import roc_auc_score

        auroc = float(roc_auc_score(labels, [-r["pl1"] for r in rows]))
    cols = ["encoder", "label", "attack", "pl1", "l1_px", "found", "epochs", "seconds", "verdict_paper",
            "threshold_calibrated", "verdict_calibrated", "true_mask_share", "zscore", "zscore_trojaned",
            "target_clean", "target_inverted", "target_true", "ref_pl1", "ref_seconds", "ref_epochs", "ref_stopped",
            "ratio_to_ref"]
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    summary = {"auroc_neg_pl1": auroc, "n_clean": len(clean), "n_backdoored": sum(labels),
               "threshold_all_clean": thr_all}
    (out / "results.md").write_text("\n".join(lines) + "\n\n" + json.dumps(summary, indent=2) + "\n")
    print("\n".join(lines), "\n", json.dumps(summary, indent=2))


def figure(rows: list[dict], work: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    from clipbd.attacks.badnets import BadNets

    true_mask, true_pattern = BadNets(patch_size=8, grid=4).mask_and_pattern(32, 32)
    fig, axes = plt.subplots(2, len(rows) + 1, figsize=(1.6 * (len(rows) + 1), 3.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0][0].imshow((true_pattern * true_mask).permute(1, 2, 0).numpy(), interpolation="nearest")
    axes[0][0].set_title("true BadNets\ntrigger", fontsize=7)
    axes[1][0].imshow(true_mask[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    for j, r in enumerate(rows, start=1):
        d = work / r["encoder"] / "decree"
        axes[0][j].imshow(np.asarray(Image.open(d / "fusion.png")), interpolation="nearest")
        axes[0][j].set_title(f"{r['encoder']}\nPL1 {r['pl1']:.4f}", fontsize=7)
        axes[1][j].imshow(np.asarray(Image.open(d / "mask.png")), cmap="gray", vmin=0, vmax=255,
                          interpolation="nearest")
    axes[1][0].set_title("mask", fontsize=7)
    fig.suptitle("DECREE: inverted mask·pattern (top) and mask (bottom) per encoder", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "triggers.png", dpi=130)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=Path("/work/runs"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/decree_pop"))
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--encoders", nargs="*", default=list(ENCODERS))
    ap.add_argument("--reference", nargs="*", default=[], help="encoders to also run the published loop on")
    ap.add_argument("--reference-normalization", default="model", choices=["model", "imagenet"])
    ap.add_argument("--reference-time-limit", type=float, default=None,
                    help="seconds after which the published loop stops and reports its best trigger so far")
    ap.add_argument("--collect-only", action="store_true", help="only tabulate what --work holds")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.encoders:
        label, kind, *_ = ENCODERS[name]
        run_dir = args.work / name if args.collect_only else prepare(args.runs, args.work, name)
        if run_dir is None or (args.collect_only and not (run_dir / "decree" / "result.json").exists()):
            print(f"skip {name}: not available", flush=True)
            continue
        res = json.loads((run_dir / "decree" / "result.json").read_text()) if args.collect_only else run_decree(run_dir, name)
        row = {"encoder": name, "label": label, "attack": kind, "pl1": res["pl1"], "l1_px": res["l1"],
               **{k: res.get(k) for k in ("found", "epochs", "seconds", "verdict_paper", "true_mask_share",
                                          "zscore", "zscore_trojaned")}}
        row |= target_shares(run_dir, name)
        ref_path = run_dir / f"reference_{args.reference_normalization}.json"
        if name in args.reference and not args.collect_only:
            run_reference(run_dir, name, res["shadow_images"], args.reference_normalization,
                          args.reference_time_limit)
        if ref_path.exists():
            ref = json.loads(ref_path.read_text())
            row |= {"ref_pl1": ref["pl1"], "ref_seconds": ref["seconds"], "ref_epochs": ref["epochs"],
                    "ref_stopped": ref.get("stopped", "early_stop"),
                    "ratio_to_ref": res["pl1"] / ref["pl1"] if ref["pl1"] else None}
        rows.append(row)
    if rows:
        collect(rows, args.out)
        figure(rows, args.work, args.out)


if __name__ == "__main__":
    main()
