"""Stage `data`: make the dataset concrete — write the synthetic shards if the dataset is synthetic,
then index the training shards (`data_index.h5`: shard paths, per-shard counts, every key) so that
each sample has a stable global index. With data.on_error=raise (training) it reads tar headers
only; images are decoded later. With data.on_error=skip (scans) it reads and decodes every sample
once and leaves the unreadable ones out of the index — the one decision every later stage sees —
listed in `skipped.csv` and counted in metrics.json (`data/skipped/<reason>`, `data/skipped/total`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from clipbd import dist
from clipbd.data.shards import ON_ERROR, build_index, expand_shards, write_skipped
from clipbd.errors import ConfigError
from clipbd.utils import progress_enabled, read_json, stable_hash, write_json

# What the index is made of: the synthetic world or the training shards, and the bad-sample policy.
# Not the evaluation settings (test_shards, classes, prompts, label_key): the stages that read them
# key them, so changing one never re-indexes (and never retrains).
DEPENDS = ("dataset.synthetic", "dataset.shards", "data")
# thread count: the same index; dataset.name: named in a message only
UNKEYED = ("data.workers", "dataset.name")
UPSTREAM: tuple[str, ...] = ()
# Re-indexing the same shards gives the same index: downstream stages keep their results.
EARLY_CUTOFF = True
# Identities of this scheme cover the training index alone; markers written before it (which also
# hashed the test split's paths, sizes and mtimes) are re-identified from their files
# (runstate._previous_identity), so an old run's model survives a changed num_test too.
IDENTITY_SCHEME = "train"
log = logging.getLogger("clipbd")


def identity(outputs: dict[str, Path]) -> str:
    """What downstream stages see of the data stage: the training index's fingerprint (shard paths,
    counts, sizes, mtimes, skips). Synthetic shards are replaced only when their bytes change
    (ShardWriter), so regenerating the same world keeps them. Not the written test split: the stages
    that read it key on the config it is made of (clipbd.data.sources.TEST_SPLIT), so a larger test
    split re-evaluates without retraining."""
    return stable_hash({"train": read_json(outputs["manifest"])["fingerprint"]})


def _synthetic(cfg: DictConfig, out: Path) -> tuple[list[str], list[str]]:
    from clipbd.data.synthetic import world_from_dict, write_split

    syn = cfg.dataset.synthetic
    world = world_from_dict(OmegaConf.to_container(syn.world, resolve=True))
    train = write_split(out, "train", syn.num_train, syn.samples_per_shard, syn.seed, world)
    test = write_split(out, "test", syn.num_test, syn.samples_per_shard, syn.seed + 1, world)
    return train, test


def _record_skips(run_dir: Path, index, on_error: str) -> None:
    """skipped.csv and data/skipped/* in metrics.json (skip mode; raise mode removes stale ones)."""
    metrics_path, csv_path = run_dir / "metrics.json", run_dir / "skipped.csv"
    old = read_json(metrics_path) if metrics_path.exists() else {}
    new = {k: v for k, v in old.items() if not k.startswith("data/skipped/")}
    if on_error == "skip":
        write_skipped(csv_path, index.skipped)
        counts = index.skip_counts()
        new |= {f"data/skipped/{r}": c for r, c in counts.items()} | {"data/skipped/total": len(index.skipped)}
        for reason, c in counts.items():
            first = next(r for r in index.skipped if r.reason == reason)
            log.warning("data: skipped %d x %s (first: %s); all in %s", c, reason, first.message, csv_path.name)
    elif csv_path.exists():
        csv_path.unlink()
    if new != old:
        write_json(metrics_path, dict(sorted(new.items())))


def main(cfg: DictConfig) -> dict[str, Path]:
    run_dir = Path(cfg.run_dir)
    ds, on_error = cfg.dataset, cfg.data.on_error
    if on_error not in ON_ERROR:
        raise ConfigError(f"data.on_error={on_error}: must be one of {', '.join(ON_ERROR)} "
                          "(skip: leave unreadable samples out and list them in skipped.csv)")
    if cfg.data.workers < 1:
        raise ConfigError(f"data.workers={cfg.data.workers}: need ≥ 1 indexing threads")
    if dist.is_main():
        if ds.synthetic is not None and ds.shards is None:
            log.info("writing synthetic shards (%d train, %d test)", ds.synthetic.num_train, ds.synthetic.num_test)
            train, test = _synthetic(cfg, run_dir / "data")
        else:
            if ds.shards is None:
                raise ConfigError(f"dataset.shards is not set for dataset '{ds.name}': point it at your "
                                  f"img2dataset webdataset shards, e.g. dataset.shards=/data/cc3m/{{00000..00331}}.tar")
            train, test = expand_shards(OmegaConf.to_container(ds.shards) if not isinstance(ds.shards, str)
                                        else ds.shards), None
        index = build_index(train, progress=progress_enabled(), workers=cfg.data.workers, on_error=on_error)
        index.save(run_dir / "data_index.h5")
        _record_skips(run_dir, index, on_error)
        # test_shards: the split this stage wrote (synthetic); given test shards are read from the
        # config by the stages that use them (clipbd.data.sources.test_shards)
        manifest = {"train_shards": list(index.shards)} | ({"test_shards": test} if test is not None else {})
        manifest |= {"num_train": len(index), "fingerprint": index.fingerprint()}
        if on_error == "skip":
            manifest |= {"on_error": on_error, "skipped": index.skip_counts()}
        write_json(run_dir / "data.json", manifest)
        log.info("indexed %d training samples in %d shards%s", len(index), len(index.shards),
                 f" ({len(index.skipped)} skipped, see skipped.csv)" if on_error == "skip" else "")
    dist.barrier()
    out = {"index": run_dir / "data_index.h5", "manifest": run_dir / "data.json"}
    return out | ({"skipped": run_dir / "skipped.csv"} if on_error == "skip" else {})
