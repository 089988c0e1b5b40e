"""Stage `extract`: embeddings and in-batch detector scores of every training sample.

Input shards are split into groups of `extract.shards_per_group`; each group becomes one
`shards/extract-XXXXX.h5` (written to a temp name, then renamed; a complete file from the same
config is skipped on re-run). Samples are seen exactly as in training — poisoned ones with their
trigger and target caption — but without augmentation. In-batch scoring (Huang et al., 2025, §3):
the group's samples are cut into scoring batches of about `scoring.batch_size` in index order (a
random order, since poisons are placed at random indices), and each sample is scored against the
other samples of its batch.

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
from omegaconf import DictConfig

from clipbd import dist
from clipbd.attacks.plan import PoisonLookup
from clipbd.data.loader import ShardDataset, make_loader
from clipbd.data.sources import load_index
from clipbd.detectors.knn import knn_scores
from clipbd.models import factory
from clipbd.registry import ConfigError, build
from clipbd.runstate import stage_key
from clipbd.stages.poison import build_attack
from clipbd.utils import atomic_path, progress

DEPENDS = ("model.name", "model.checkpoint", "extract.shards_per_group", "scoring", "detector", "seed")
UPSTREAM = ("data", "poison", "pretrain")
log = logging.getLogger("clipbd")


def build_detectors(cfg: DictConfig) -> dict[str, object]:
    if not cfg.detector:
        raise ConfigError("detector: no detector selected (e.g. detector=[dao,slof,kdist,lid])")
    return {name: build(node, f"detector.{name}") for name, node in cfg.detector.items()}


def group_paths(cfg: DictConfig, num_shards: int) -> list[tuple[Path, list[int]]]:
    """[(h5 path, shard ids)] for every extraction group of the run."""
    per = cfg.extract.shards_per_group
    if per < 1:
        raise ConfigError(f"extract.shards_per_group={per}: must be ≥ 1")
    out_dir = Path(cfg.run_dir) / "shards"
    return [(out_dir / f"extract-{g:05d}.h5", list(range(s, min(s + per, num_shards))))
            for g, s in enumerate(range(0, num_shards, per))]


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
def embed(bundle, loader, device: str, desc: str) -> dict[str, np.ndarray | list]:
    """Raw (unnormalised) image and text embeddings, in loader order."""
    cols: dict[str, list] = defaultdict(list)
    for batch in progress(loader, desc=desc, leave=False):
        images = bundle.normalize(batch["image"].to(device))
        texts = bundle.tokenizer(batch["caption"]).to(device)
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


def scoring_features(emb: dict, kind: str) -> np.ndarray:
    if kind == "image":
        return emb["image_emb"]
    if kind == "text":
        return emb["text_emb"]
    if kind == "image+text":
        return np.concatenate([emb["image_emb"], emb["text_emb"]], axis=1)
    raise ConfigError(f"scoring.features={kind}: must be image, text or image+text")


def score_in_batch(feats: np.ndarray, detectors: dict, batch_size: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Scores of every row against the other rows of its scoring batch; also each row's batch id."""
    n = len(feats)
    n_batches = max(1, int(round(n / batch_size)))
    batch_id = np.zeros(n, dtype=np.int32)
    scores = {name: np.empty(n, dtype=np.float64) for name in detectors}
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, det in detectors.items():
        groups[det.group].append(name)
    for b, rows in enumerate(np.array_split(np.arange(n), n_batches)):
        batch_id[rows] = b
        for (k, convention), names in groups.items():
            if k >= len(rows):
                raise ConfigError(f"detector k={k} must be < the scoring batch size {len(rows)} "
                                  f"(scoring.batch_size={batch_size}, {n} samples in this group)")
            methods = tuple(dict.fromkeys(detectors[nm].method for nm in names))
            res = knn_scores(torch.from_numpy(feats[rows]), None, k=k, methods=methods, convention=convention)
            for nm in names:
                scores[nm][rows] = res[detectors[nm].method]
    return scores, batch_id


def write_group(path: Path, key: str, emb: dict, scores: dict, batch_id: np.ndarray, shards: list[str]) -> None:
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
        f["score_batch"] = batch_id
        for name, s in scores.items():
            f[f"scores/{name}"] = s


def main(cfg: DictConfig) -> dict[str, Path]:
    info = dist.info()
    key = stage_key(cfg, "extract")
    detectors = build_detectors(cfg)
    if cfg.scoring.reference != "batch":
        raise ConfigError(f"scoring.reference={cfg.scoring.reference}: only 'batch' is implemented so far")
    index = load_index(cfg)
    groups = group_paths(cfg, len(index.shards))
    mine = task_groups(cfg, len(groups))[info.rank::info.world]
    todo = [groups[g] for g in mine if not is_group_done(groups[g][0], key)]
    log.info("extract: %d of %d groups to do (%d of this task/rank already done)", len(todo), len(groups),
             len(mine) - len(todo))
    if todo:
        bundle = factory.create_trained(cfg, device=info.device)
        lookup = PoisonLookup.load(Path(cfg.run_dir) / "poison_plan.json")
        attack = build_attack(cfg)
        for path, ids in todo:
            ds = ShardDataset(index, ids, bundle.to_tensor(), lookup, attack)
            emb = embed(bundle, make_loader(ds, cfg.extract.batch_size, cfg.extract.workers), info.device, path.name)
            if len(emb["index"]) == 0:
                scores, batch_id = {n: np.empty(0) for n in detectors}, np.empty(0, dtype=np.int32)
            else:
                feats = scoring_features(emb, cfg.scoring.features)
                scores, batch_id = score_in_batch(feats, detectors, cfg.scoring.batch_size)
            write_group(path, key, emb, scores, batch_id, [index.shards[i] for i in ids])
            log.info("wrote %s (%d samples)", path.name, len(emb["index"]))
    dist.barrier()
    return {p.name: p for p, _ in groups}
