"""The run directory's layout: where each stage's artifacts live, and the one writer of metrics.json.

Stages talk to each other only through these files (docs/architecture.md, "Artifacts"):

    data_index.h5, data.json        data       the training shards, indexed
    poison_plan.json                poison     which samples are poisoned, and how
    checkpoints/{epoch_N,latest}.pt pretrain   the trained CLIP
    shards/extract-XXXXX.h5         extract    embeddings (+ image-detector scores) of one group of shards
    shards/bank.h5                  extract    a held-out reference bank (scoring=bank)
    scores.h5, ranked.csv           reduce     every sample's scores (scored from the embeddings), most suspicious first
    metrics.json                    reduce, evaluate, ...: flat namespaced metrics (prefix per stage)
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from clipbd.errors import ConfigError
from clipbd.utils import read_json, write_json


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.run_dir)


def poison_plan(cfg: DictConfig) -> Path:
    return run_dir(cfg) / "poison_plan.json"


def checkpoint_dir(cfg: DictConfig) -> Path:
    return run_dir(cfg) / "checkpoints"


def latest_checkpoint(cfg: DictConfig) -> Path:
    return checkpoint_dir(cfg) / "latest.pt"


def metrics(cfg_or_dir: DictConfig | str | Path) -> Path:
    d = Path(cfg_or_dir) if isinstance(cfg_or_dir, (str, Path)) else run_dir(cfg_or_dir)
    return d / "metrics.json"


def group_paths(cfg: DictConfig, num_shards: int) -> list[tuple[Path, list[int]]]:
    """[(h5 path, shard ids)] for every extraction group of the run."""
    per = cfg.extract.shards_per_group
    if per < 1:
        raise ConfigError(f"extract.shards_per_group={per}: must be ≥ 1")
    out_dir = run_dir(cfg) / "shards"
    return [(out_dir / f"extract-{g:05d}.h5", list(range(s, min(s + per, num_shards))))
            for g, s in enumerate(range(0, num_shards, per))]


def bank_path(cfg: DictConfig) -> Path:
    return run_dir(cfg) / "shards" / "bank.h5"


def update_metrics(run_dir_: str | Path, prefix: str, new: dict) -> dict:
    """Replace every `prefix*` key of metrics.json by `new` (other stages' keys are kept)."""
    path = metrics(run_dir_)
    old = read_json(path) if path.exists() else {}
    merged = {k: v for k, v in old.items() if not k.startswith(prefix)} | new
    write_json(path, dict(sorted(merged.items())))
    return merged
