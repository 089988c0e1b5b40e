"""Stage `invert` (not in the default list): trigger inversion for a caption on the run's model
(clipbd.inspect.invert) — `invert.caption` (a caption, or `target`: the poison plan's target
captions, averaged as a prompt ensemble), or `invert.cluster` (a cluster of report/clusters.csv) —
and, beside it, the same inversion aimed at a control caption (`invert.control`; auto: a prompt of
a clean class). Optimises on the first half of `invert.num_images` clean held-out images and
measures ASR on the second half. Writes `invert/` (mask, pattern, stamped PNGs per role, the real
trigger when the attack has one, summary.json) and `inspect/invert/<role>/...` metrics. A report
run after it (`stages=[invert,report]`) shows the result.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from clipbd import dist
from clipbd.registry import build_attack
from clipbd.data.loader import ShardDataset, make_loader
from clipbd.data.shards import build_index
from clipbd.data.sources import TEST_SPLIT, class_names, prompt_fn, test_shards
from clipbd.inspect.invert import attack_success, candidate_classes, invert
from clipbd.models import factory
from clipbd.models.zeroshot import class_embeddings
from clipbd.plots import save_image_grid
from clipbd.registry import ConfigError
from clipbd.rundir import update_metrics
from clipbd.utils import derive_seed, read_json, write_json

DEPENDS = ("invert", "seed", "attack", "dataset.classes", "dataset.prompts", "dataset.label_key", *TEST_SPLIT,
           "eval.prompts_per_class",
           "model.name", "model.arch", "model.checkpoint")
NEEDS_MODEL = True  # a trained model: this run's pretraining or model.checkpoint
UPSTREAM = ("data", "poison", "pretrain")
log = logging.getLogger("clipbd")


def target_captions(cfg: DictConfig, run_dir: Path) -> tuple[list[str], str | None]:
    """The captions to invert towards (several: averaged) and the class they name, if known."""
    ic = cfg.invert
    if ic.caption == "target":
        plan = read_json(run_dir / "poison_plan.json")
        if not plan.get("poison_text"):
            raise ConfigError("invert.caption=target: this run's poison plan has no target captions (attack=none?); "
                              "give the caption itself")
        return list(dict.fromkeys(plan["poison_text"])), plan.get("target_class")
    if ic.caption is not None:
        return [str(ic.caption)], None
    path = run_dir / "report" / "clusters.csv"
    if not path.exists():
        raise ConfigError(f"invert.cluster={ic.cluster}: {path} is missing; run the report stage first")
    with open(path, newline="") as fh:
        rows = {int(r["cluster"]): r["caption"] for r in csv.DictReader(fh)}
    if ic.cluster not in rows:
        raise ConfigError(f"invert.cluster={ic.cluster}: not a cluster of {path} (0..{max(rows)})")
    return [rows[ic.cluster]], None


def held_out(cfg: DictConfig, bundle, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` clean held-out images [n, 3, H, W] in [0, 1] and their labels [n]."""
    shards = test_shards(cfg)
    if not shards:
        raise ConfigError("invert: the run has no held-out test shards (dataset.test_shards) to invert on")
    ds = ShardDataset(build_index(shards, progress=False), range(len(shards)), bundle.to_tensor(),
                      label_key=cfg.dataset.label_key)
    images, labels = [], []
    for batch in make_loader(ds, 256):
        images.append(batch["image"])
        labels.append(batch["label"])
        if sum(len(x) for x in images) >= n:
            break
    return torch.cat(images)[:n], torch.cat(labels)[:n]


def _one(role: str, captions: list[str], own_name: str | None, ctx: dict, out_dir: Path) -> dict:
    """Invert towards `captions`; ASR on the held-out half; PNGs; the summary row."""
    ic, classes, bundle = ctx["cfg"].invert, ctx["classes"], ctx["bundle"]
    cand, own = candidate_classes(classes, captions[0])
    if own_name is not None:
        own = classes.index(own_name)
        cand = [i for i in range(len(classes)) if i != own]
    cap_emb = class_embeddings(bundle.model, bundle.tokenizer, [captions])
    emb = torch.cat([ctx["class_emb"][cand], cap_emb])
    target = len(cand)
    gen = torch.Generator().manual_seed(derive_seed(ctx["cfg"].seed, f"invert/{role}") % (2**63))
    images, labels, half = ctx["images"], ctx["labels"], len(ctx["images"]) // 2
    inv = invert(ctx["encode"], images[:half], emb, target, steps=ic.steps, lr=ic.lr, batch_size=ic.batch_size,
                 lam=ic.lam, lam_up=ic.lam_up, asr_goal=ic.asr_goal, generator=gen)
    m = attack_success(ctx["encode"], images[half:], labels[half:], emb, target, inv.mask, inv.pattern, own)
    files = {"mask": f"{role}_mask.png", "pattern": f"{role}_pattern.png", "stamped": f"{role}_stamped.png"}
    save_image_grid(out_dir / files["mask"], inv.mask.expand(3, -1, -1)[None])
    save_image_grid(out_dir / files["pattern"], (inv.mask * inv.pattern)[None])
    save_image_grid(out_dir / files["stamped"], inv.mask * inv.pattern + (1 - inv.mask) * images[half:half + 8])
    row = {"role": role, "caption": captions[0] + (f" (+{len(captions) - 1} more, averaged)" if len(captions) > 1 else ""),
           "own_class": None if own is None else classes[own], "mask_l1": float(inv.mask.sum()),
           "pixels": int(inv.mask[0].numel()), "reached_goal": inv.reached_goal, "files": files, **m}
    write_json(out_dir / f"{role}_history.json", inv.history)
    log.info("invert %s: '%s' ASR %.3f (excl. own class %.3f, clean %.3f), mask L1 %.1f of %d px%s", role,
             row["caption"], m["asr"], m["asr_excl"], m["clean_rate"], row["mask_l1"], row["pixels"],
             "" if inv.reached_goal else " (never reached invert.asr_goal)")
    return row


def _control(cfg: DictConfig, classes: list[str], avoid: str | None) -> list[str] | None:
    if cfg.invert.control is None:
        return None
    if cfg.invert.control != "auto":
        return [str(cfg.invert.control)]
    clean = next(c for c in classes if c != avoid)
    return prompt_fn(cfg)(clean, n=1, seed=derive_seed(cfg.seed, "invert/control") % (2**31))


def context(cfg: DictConfig) -> dict:
    """What every inversion of a run works on (this stage's, experiments/natural/controls.py's): the
    trained model (frozen), the dataset's classes and their class embeddings as the evaluate stage
    makes them, and the first `invert.num_images` clean held-out images with their labels."""
    bundle = factory.create_trained(cfg, device="cpu")
    bundle.model.requires_grad_(False)
    classes, prompts = class_names(cfg), prompt_fn(cfg)
    seed = derive_seed(cfg.seed, "zeroshot") % (2**31)  # the evaluate stage's class embeddings
    class_emb = class_embeddings(bundle.model, bundle.tokenizer,
                                 [prompts(c, n=cfg.eval.prompts_per_class, seed=seed) for c in classes])
    images, labels = held_out(cfg, bundle, cfg.invert.num_images)
    return {"cfg": cfg, "classes": classes, "bundle": bundle, "class_emb": class_emb, "images": images,
            "labels": labels, "encode": lambda x: bundle.model.encode_image(bundle.normalize(x))}


def main(cfg: DictConfig) -> dict[str, Path]:
    ic, run_dir = cfg.invert, Path(cfg.run_dir)
    out_dir = run_dir / "invert"
    out = {"summary": out_dir / "summary.json"}
    if not dist.is_main():
        return out
    if ic.caption is None and ic.cluster is None:
        raise ConfigError("invert: set invert.caption='<caption>' (or target: the poison plan's) or invert.cluster=<id>")
    if ic.steps < 1 or ic.num_images < 4 or not 0 < ic.asr_goal <= 1 or ic.lam_up <= 1:
        raise ConfigError(f"invert: steps={ic.steps} (≥ 1), num_images={ic.num_images} (≥ 4), asr_goal="
                          f"{ic.asr_goal} (in (0, 1]), lam_up={ic.lam_up} (> 1) out of range")
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = context(cfg)
    classes, images = ctx["classes"], ctx["images"]
    captions, own_name = target_captions(cfg, run_dir)
    rows = [_one("target", captions, own_name, ctx, out_dir)]
    own = candidate_classes(classes, captions[0])[1]
    control = _control(cfg, classes, own_name if own_name is not None else None if own is None else classes[own])
    if control is not None:
        rows.append(_one("control", control, None, ctx, out_dir))
    metrics = {f"inspect/invert/{r['role']}/{k}": float(r[k]) for r in rows
               for k in ("asr", "asr_excl", "clean_rate", "mask_l1", "reached_goal")}
    attack = build_attack(cfg)
    if attack is not None and hasattr(attack, "mask_and_pattern"):  # the real trigger, to set beside it
        h = images.shape[-1]
        real_mask, real_pattern = attack.mask_and_pattern(h, h)
        save_image_grid(out_dir / "real_trigger.png", real_pattern[None])
        metrics["inspect/invert/real_trigger_px"] = float(real_mask.sum())
        metrics["inspect/invert/target/mask_vs_real"] = float(rows[0]["mask_l1"] / max(float(real_mask.sum()), 1))
        rows[0]["files"]["real trigger"] = "real_trigger.png"
    update_metrics(run_dir, "inspect/invert/", metrics)
    write_json(out["summary"], rows)
    return out
