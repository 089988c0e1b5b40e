"""Stage `extract`: image and text embeddings of every training sample, and the scores of the
detectors that need the images themselves.

Input shards are split into groups of `extract.shards_per_group`; each group becomes one
`shards/extract-XXXXX.h5` (written to a temp name, then renamed; a complete file from the same
config is skipped on re-run; `force=[extract]` redoes them). Samples are seen exactly as in training — poisoned ones with their
trigger and target caption — but without augmentation. Only image-based detectors (Cognitive
Distillation) are scored here, during the embedding pass (`scores/<name>`); every other detector is a
function of the stored embeddings and is scored by `reduce` (clipbd.scoring), so changing a detector
or scoring setting re-scores without decoding an image: this stage's key holds the model, the
embedding settings and the image detectors only. A held-out bank
(`scoring=bank scoring.bank_source=test|<shards>`) is embedded here into `shards/bank.h5` by the task
that has group 0.

Scale-out: the groups are independent, so extraction is a job array. `extract.num_tasks=N
extract.task=i` does the groups g with g % N == i (`extract.groups=[..]` names groups explicitly), and
the ranks of one task share its groups out again. A scoring batch is always cut from one group in
index order, whatever the layout of tasks and ranks, so any split gives bit-identical files.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from clipbd import dist, rundir, scoring
from clipbd.attacks.plan import PoisonLookup
from clipbd.data.loader import ShardDataset, batches, make_loader
from clipbd.data.shards import build_index, expand_shards
from clipbd.data.sources import load_index, test_shards
from clipbd.detectors.reference import draw_bank
from clipbd.models import factory
from clipbd.models.factory import autocast
from clipbd.errors import ConfigError
from clipbd.registry import build_attack
from clipbd.rundir import bank_path, group_paths
from clipbd.runstate import stage_key
from clipbd.utils import atomic_path, progress, rng

DEPENDS = ("model.name", "model.arch", "model.checkpoint", "extract.shards_per_group", "extract.batch_size", "seed")
# the job-array split and loader workers: any split, any worker count gives the same files
UNKEYED = ("extract.task", "extract.num_tasks", "extract.groups", "extract.workers", "extract.prefetch")
UPSTREAM = ("data", "poison", "pretrain")
NEEDS_MODEL = True  # a trained model: this run's pretraining or model.checkpoint (checked first)
log = logging.getLogger("clipbd")


def depends(cfg: DictConfig) -> tuple[str, ...]:
    """DEPENDS, the settings of the detectors scored on images here, and the held-out bank's
    settings when one is embedded (clipbd.scoring.heldout_bank_keys)."""
    images = tuple(f"detector.{n}" for n in scoring.image_detector_names(cfg))
    # mixed precision (on CUDA) changes the embeddings; fp32, what every earlier run used, keeps its key
    precision = ("model.precision",) if cfg.model.precision != "fp32" else ()
    return DEPENDS + images + scoring.heldout_bank_keys(cfg) + precision


def task_groups(cfg: DictConfig, n_groups: int) -> list[int]:
    """The groups this array task extracts: `extract.groups` if set, else g ≡ task (mod num_tasks)."""
    ec = cfg.extract
    if ec.groups is not None:
        bad = [g for g in ec.groups if not 0 <= g < n_groups]
        if bad:
            raise ConfigError(f"extract.groups={list(ec.groups)}: group(s) {bad} out of range; this run has "
                              f"{n_groups} groups (0..{n_groups - 1})")
        return sorted(set(ec.groups))
    if ec.num_tasks < 1 or not 0 <= ec.task < ec.num_tasks:
        raise ConfigError(f"extract.task={ec.task}, extract.num_tasks={ec.num_tasks}: need num_tasks ≥ 1 and "
                          f"0 ≤ task < num_tasks (in a SLURM array: extract.task=${{oc.env:SLURM_ARRAY_TASK_ID}})")
    return list(range(ec.task, n_groups, ec.num_tasks))


def is_group_done(path: Path, key: str) -> bool:
    if not path.exists():
        return False
    with h5py.File(path, "r") as f:
        return f.attrs.get("stage_key") == key


@torch.no_grad()
def embed(bundle, loader, device: str, desc: str, score_images=None,
          precision: str = "fp32") -> dict[str, np.ndarray | list]:
    """Raw (unnormalised) image and text embeddings, in loader order (batches with `tokens` are
    not tokenised again: clipbd.data.loader.batches does it ahead); with `score_images`
    (clipbd.scoring.image_scorer) also the image detectors' scores as `scores/<name>`."""
    cols: dict[str, list] = defaultdict(list)
    for batch in progress(loader, desc=desc, leave=False):
        if score_images is not None:
            for name, s in score_images(batch["image"].to(device)).items():
                cols[f"scores/{name}"].append(torch.from_numpy(s))
        images = bundle.normalize(batch["image"].to(device, non_blocking=True))
        tokens = batch["tokens"] if "tokens" in batch else bundle.tokenizer(batch["caption"])
        texts = tokens.to(device, non_blocking=True)
        with autocast(device, precision), torch.inference_mode():  # no autograd bookkeeping at all
            cols["image_emb"].append(bundle.model.encode_image(images).float().cpu())
            cols["text_emb"].append(bundle.model.encode_text(texts).float().cpu())
        cols["index"].append(batch["index"])
        cols["poisoned"].append(batch["poisoned"])
        cols["key"] += batch["key"]
        cols["caption"] += batch["caption"]
    if not cols:  # a shard group with no samples (e.g. img2dataset shards with zero successes)
        return {"image_emb": np.zeros((0, 0), np.float32), "text_emb": np.zeros((0, 0), np.float32),
                "index": np.zeros(0, np.int64), "poisoned": np.zeros(0, bool), "key": [], "caption": []}
    out: dict = {k: torch.cat(v).numpy() for k, v in cols.items() if k not in ("key", "caption")}
    out["key"], out["caption"] = cols["key"], cols["caption"]
    return out


def image_scores(emb: dict, detectors: dict) -> dict[str, np.ndarray]:
    """The image detectors' scores of one group (taken out of `emb`; empty arrays for an empty group)."""
    scores = {k.split("/", 1)[1]: emb.pop(k) for k in list(emb) if k.startswith("scores/")}
    return {m: scores.get(m, np.empty(0)) for m in detectors}


def extract_bank(cfg: DictConfig, key: str, device: str, forced: bool = False) -> None:
    """scoring=bank from held-out shards: embed them (clean, no trigger) once into shards/bank.h5,
    keeping `scoring.bank_size` rows drawn with the seed."""
    path = bank_path(cfg)
    if not scoring.heldout_bank_keys(cfg) or (is_group_done(path, key) and not forced):
        return
    source, size = cfg.scoring.bank_source, int(cfg.scoring.bank_size)
    source = source if isinstance(source, str) else OmegaConf.to_container(source, resolve=True)
    shards = test_shards(cfg) if source == "test" else expand_shards(source)
    if not shards:
        raise ConfigError(f"scoring.bank_source={source}: no shards (the run has no test split?)")
    bank_index = build_index(shards, progress=False)
    bundle = factory.create_trained(cfg, device=device)
    ds = ShardDataset(bank_index, range(len(bank_index.shards)), bundle.to_tensor())
    emb = embed(bundle, _batches(cfg, bundle, ds, device), device, path.name, precision=cfg.model.precision)
    rows = draw_bank(len(emb["index"]), size, rng(cfg.seed, "bank"))
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["stage_key"] = key
        f.attrs["producer"] = "clipbd.stages.extract (held-out bank)"
        f.attrs["shards"] = np.array(shards, dtype=h5py.string_dtype())
        f["index"] = emb["index"][rows].astype(np.int64)  # position in the held-out shards
        f["key"] = np.array([emb["key"][i] for i in rows], dtype=h5py.string_dtype())
        f["image_emb"] = emb["image_emb"][rows]
        f["text_emb"] = emb["text_emb"][rows]
    log.info("wrote %s (%d of %d held-out samples)", path.name, len(rows), len(emb["index"]))


def _batches(cfg: DictConfig, bundle, ds: ShardDataset, device: str):
    """The group's batches, read, decoded, poisoned and tokenised ahead of the model (`extract.prefetch`)."""
    return batches(make_loader(ds, cfg.extract.batch_size, cfg.extract.workers), bundle.tokenizer,
                   cfg.extract.prefetch, pin=device.startswith("cuda"))


def write_group(path: Path, key: str, emb: dict, scores: dict, shards: list[str]) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["stage_key"] = key
        f.attrs["producer"] = "clipbd.stages.extract"
        f.attrs["shards"] = np.array(shards, dtype=h5py.string_dtype())
        f["index"] = emb["index"].astype(np.int64)
        f["key"] = np.array(emb["key"], dtype=h5py.string_dtype())
        f["caption"] = np.array(emb["caption"], dtype=h5py.string_dtype())
        f["poisoned"] = emb["poisoned"].astype(np.int8)
        f.create_dataset("image_emb", data=emb["image_emb"], compression="gzip", compression_opts=1)
        f.create_dataset("text_emb", data=emb["text_emb"], compression="gzip", compression_opts=1)
        for name, s in scores.items():
            f[f"scores/{name}"] = s


def main(cfg: DictConfig) -> dict[str, Path]:
    info = dist.info()
    key = stage_key(cfg, "extract")
    detectors = scoring.image_detectors(cfg)
    index = load_index(cfg)
    groups = group_paths(cfg, len(index.shards))
    mine = task_groups(cfg, len(groups))[info.rank::info.world]
    forced = "extract" in cfg.force  # force=[extract]: redo this task's groups, finished or not
    todo = [groups[g] for g in mine if forced or not is_group_done(groups[g][0], key)]
    log.info("extract: %d of %d groups to do (%d of this task/rank already done%s)", len(todo), len(groups),
             len(mine) - len(todo), ", force=[extract]" if forced else "")
    if todo:
        bundle = factory.create_trained(cfg, device=info.device)
        lookup = PoisonLookup.load(rundir.poison_plan(cfg))
        attack = build_attack(cfg)
        for path, ids in todo:
            ds = ShardDataset(index, ids, bundle.to_tensor(), lookup, attack)
            score_images = scoring.image_scorer(bundle, detectors, cfg.seed, path.stem, info.device)
            emb = embed(bundle, _batches(cfg, bundle, ds, info.device), info.device, path.name, score_images,
                        precision=cfg.model.precision)
            write_group(path, key, emb, image_scores(emb, detectors), [index.shards[i] for i in ids])
            log.info("wrote %s (%d samples)", path.name, len(emb["index"]))
    if 0 in mine:  # one task/rank also embeds a held-out bank (scoring=bank)
        extract_bank(cfg, key, info.device, forced)
    dist.barrier()
    return {p.name: p for p, _ in groups}
