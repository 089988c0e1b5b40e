"""Stage `filter` (filter-and-retrain, not in the default stage list): read a finished run's
`scores.h5` (`filter.source_run`), take the top `filter.drop_fraction` of its training samples by
`filter.detector`, and write them to `filter/excluded.json`; the `pretrain` stage of this run then
trains on the rest (kept = 1 - drop_fraction; the paper's safe_percentage is the kept fraction).
The source run must have been trained on the same data with the same poison plan (same overrides).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from clipbd import dist
from clipbd.curation.filter import EXCLUDED_FILE, read_detector_scores, top_fraction, write_excluded
from clipbd.data.shards import ShardIndex
from clipbd.registry import ConfigError
from clipbd.utils import read_json

DEPENDS = ("filter",)
UPSTREAM = ("data", "poison")
log = logging.getLogger("clipbd")


def _check_same_run(src: Path, run_dir: Path) -> None:
    """The source run's samples (keys in index order) and poison plan must be this run's: its scores
    are indexed by the same global sample indices."""
    for name in ("data_index.h5", "poison_plan.json"):
        if not (src / name).exists():
            raise ConfigError(f"filter.source_run={src}: no {name}; point it at a finished run directory")
    same_keys = np.array_equal(ShardIndex.load(src / "data_index.h5").keys, ShardIndex.load(run_dir / "data_index.h5").keys)
    same_plan = read_json(src / "poison_plan.json").get("poison_indices") == \
        read_json(run_dir / "poison_plan.json").get("poison_indices")
    if not (same_keys and same_plan):
        what = "sample keys (data_index.h5)" if not same_keys else "poison plan (poison_plan.json)"
        raise ConfigError(f"filter.source_run={src}: its {what} differ from this run's; retrain with the "
                          "source run's overrides (same dataset, attack and seed)")


def main(cfg: DictConfig) -> dict[str, Path]:
    fc, run_dir = cfg.filter, Path(cfg.run_dir)
    out = {"excluded": run_dir / EXCLUDED_FILE}
    if fc.source_run is None:
        raise ConfigError("filter.source_run is not set: give the finished run to filter, e.g. "
                          "filter.source_run=/work/runs/bn_s0")
    if not 0.0 <= fc.drop_fraction < 1.0:
        raise ConfigError(f"filter.drop_fraction={fc.drop_fraction}: need 0 <= drop_fraction < 1 "
                          "(the fraction dropped; kept = 1 - drop_fraction)")
    src = Path(fc.source_run)
    if dist.is_main():
        if not (src / "scores.h5").exists():
            raise ConfigError(f"filter.source_run={src}: no scores.h5; run its extract and reduce stages first")
        _check_same_run(src, run_dir)
        try:
            scores = read_detector_scores(src / "scores.h5", fc.detector)
        except KeyError as e:
            raise ConfigError(f"filter.detector={fc.detector}: not scored in {src}/scores.h5 (has {e.args[1]}); "
                              f"score it there first: stages=[extract,reduce] with the detector added") from None
        excluded = top_fraction(scores, fc.drop_fraction)
        plan = read_json(run_dir / "poison_plan.json")
        poisons = np.asarray(plan.get("poison_indices", []), dtype=np.int64)
        caught = int(np.isin(poisons, excluded).sum())
        write_excluded(out["excluded"], excluded, {"source_run": str(src), "detector": fc.detector,
                                                  "drop_fraction": fc.drop_fraction, "num_samples": len(scores),
                                                  "poisons_excluded": caught, "poisons": int(len(poisons))})
        log.info("filter: excluding %d of %d samples (top %.1f%% by %s); %d of %d poisons among them",
                 len(excluded), len(scores), 100 * fc.drop_fraction, fc.detector, caught, len(poisons))
    dist.barrier()
    return out
