"""Stage `data`: make the dataset concrete — write the synthetic shards if the dataset is synthetic,
then index the training shards (`data_index.h5`: shard paths, per-shard counts, every key) so that
each sample has a stable global index. Reads tar headers only; images are decoded later.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from clipbd import dist
from clipbd.data.shards import build_index, expand_shards
from clipbd.registry import ConfigError
from clipbd.utils import progress_enabled, write_json

DEPENDS = ("dataset",)
UPSTREAM: tuple[str, ...] = ()
log = logging.getLogger("clipbd")


def _synthetic(cfg: DictConfig, out: Path) -> tuple[list[str], list[str]]:
    from clipbd.data.synthetic import world_from_dict, write_split

    syn = cfg.dataset.synthetic
    world = world_from_dict(OmegaConf.to_container(syn.world, resolve=True))
    train = write_split(out, "train", syn.num_train, syn.samples_per_shard, syn.seed, world)
    test = write_split(out, "test", syn.num_test, syn.samples_per_shard, syn.seed + 1, world)
    return train, test


def main(cfg: DictConfig) -> dict[str, Path]:
    run_dir = Path(cfg.run_dir)
    ds = cfg.dataset
    if dist.is_main():
        if ds.synthetic is not None and ds.shards is None:
            log.info("writing synthetic shards (%d train, %d test)", ds.synthetic.num_train, ds.synthetic.num_test)
            train, test = _synthetic(cfg, run_dir / "data")
        else:
            if ds.shards is None:
                raise ConfigError(f"dataset.shards is not set for dataset '{ds.name}': point it at your "
                                  f"img2dataset webdataset shards, e.g. dataset.shards=/data/cc3m/{{00000..00331}}.tar")
            train = expand_shards(OmegaConf.to_container(ds.shards) if not isinstance(ds.shards, str) else ds.shards)
            test = (expand_shards(OmegaConf.to_container(ds.test_shards) if not isinstance(ds.test_shards, str)
                                  else ds.test_shards) if ds.test_shards is not None else [])
        index = build_index(train, progress=progress_enabled())
        index.save(run_dir / "data_index.h5")
        write_json(run_dir / "data.json", {"train_shards": list(index.shards), "test_shards": test,
                                           "num_train": len(index), "fingerprint": index.fingerprint()})
        log.info("indexed %d training samples in %d shards", len(index), len(index.shards))
    dist.barrier()
    return {"index": run_dir / "data_index.h5", "manifest": run_dir / "data.json"}
