"""Stage `reduce`: score every sample from the embeddings extract stored (every detector but the
image-based ones, which extract scored while embedding: clipbd.scoring), merge the extraction groups
into `scores.h5` (one dataset per detector, indexed by global sample index; `score_batch`: each
sample's in-batch scoring batch within its group, scoring=batch), check that every sample is there
exactly once, compute detection metrics
(AUROC, AUPRC, FPR at 95% TPR) against the poison plan, write `ranked.csv` (most suspicious first
by `report.sort_by`, with each sample's shard file and tar member) and the ROC / score-histogram
plots. "Every sample" is every sample of the index: those the data stage skipped (skipped.csv) are
not in it, so they are neither expected nor reported missing.
"""

from __future__ import annotations

import csv
import logging
import shlex
from pathlib import Path

import h5py
import numpy as np
from omegaconf import DictConfig

from clipbd import dist, scoring
from clipbd.config import REPORT_PAGE_KEYS
from clipbd.attacks.plan import PoisonLookup
from clipbd.detectors.ranking import sort_detector
from clipbd.data.sources import load_index
from clipbd.metrics import detection_metrics
from clipbd.plots import roc_plot, score_histograms
from clipbd.errors import CoverageError
from clipbd.registry import build_detectors
from clipbd.rundir import bank_path, group_paths, update_metrics
from clipbd.utils import atomic_path, read_json

DEPENDS = ("detector", "scoring", "seed", "report")
# the report stage's own settings: they change the page, not scores.h5 or ranked.csv
UNKEYED = tuple(f"report.{k}" for k in REPORT_PAGE_KEYS)
UPSTREAM = ("data", "poison", "extract")
log = logging.getLogger("clipbd")


def _describe(indices: np.ndarray, index) -> str:
    shard_ids, _ = index.locate(indices[:20])
    where = sorted({Path(index.shards[s]).name for s in shard_ids})
    skipped = f"; the {len(index.skipped)} skipped while indexing (skipped.csv) are not expected" if index.skipped else ""
    return f"{len(indices)} (first: {indices[:10].tolist()}; in shards {', '.join(where[:5])}{skipped})"


_PER_JOB = ("stages=", "extract.task=", "extract.num_tasks=", "extract.groups=", "force=", "run_dir=", "hydra.")


def rerun_command(cfg: DictConfig, groups: list[int]) -> str:
    """The command that extracts only `groups` of this run and reduces again (the run's own
    overrides from meta.json, minus the per-job ones)."""
    run_dir = Path(cfg.run_dir)
    meta = read_json(run_dir / "meta.json") if (run_dir / "meta.json").exists() else {}
    kept = [o for o in meta.get("overrides") or [] if not o.lstrip("+~").startswith(_PER_JOB)]
    args = [shlex.quote(o) for o in kept] + [f"hydra.run.dir={shlex.quote(str(run_dir))}",
                                             "'stages=[extract,reduce]'", f"'extract.groups=[{','.join(map(str, groups))}]'"]
    return "python -m clipbd.run " + " ".join(args)


def gather(cfg: DictConfig, index, detectors: dict | None = None, scorer=None) -> dict:
    """Concatenate all extraction groups, each scored from its embeddings (clipbd.scoring.
    embedding_scores: pair, training and — scoring=batch — in-batch detectors); refuse if a group, a
    sample, or uniqueness is missing."""
    groups = group_paths(cfg, len(index.shards))
    missing = [g for g, (p, _) in enumerate(groups) if not p.exists()]
    if missing:
        names = ", ".join(groups[g][0].name for g in missing[:5])
        shards = [Path(index.shards[i]).name for g in missing for i in groups[g][1]]
        raise CoverageError(f"reduce: {len(missing)} of {len(groups)} extraction files missing ({names}"
                            f"{', ...' if len(missing) > 5 else ''}) covering shards {', '.join(shards[:8])}"
                            f"{', ...' if len(shards) > 8 else ''}; re-run only those with: "
                            f"{rerun_command(cfg, missing)}")
    cols: dict[str, list] = {}
    here = detectors or {}
    for p, _ in groups:
        with h5py.File(p, "r") as f:
            # the image detectors' scores extract wrote; the rest is scored here from the embeddings
            names = ["index", "key", "caption"] + [f"scores/{n}" for n in f.get("scores", {}) if n not in here]
            for n in names:
                cols.setdefault(n, []).append(f[n][()])
            if here:
                emb = {n: f[n][()] for n in ("index", "image_emb", "text_emb")}
                scores, batch_id = scoring.embedding_scores(emb, here, scorer, cfg.seed, cfg.run_dir)
                for n, v in scores.items():
                    cols.setdefault(f"scores/{n}", []).append(v)
                if scorer.per_group:
                    cols.setdefault("score_batch", []).append(batch_id)
    merged = {n: np.concatenate(v) for n, v in cols.items()}
    idx = merged["index"]
    n = len(index)
    counts = np.bincount(idx, minlength=n) if len(idx) else np.zeros(n, dtype=np.int64)
    if len(counts) > n:
        raise CoverageError(f"reduce: sample indices beyond the dataset size {n}: {np.nonzero(counts[n:])[0][:10] + n}")
    if (counts == 0).any():
        raise CoverageError(f"reduce: samples missing from extraction: {_describe(np.nonzero(counts == 0)[0], index)}")
    if (counts > 1).any():
        raise CoverageError(f"reduce: samples extracted more than once: {_describe(np.nonzero(counts > 1)[0], index)}")
    order = np.argsort(idx, kind="stable")
    return {k: v[order] for k, v in merged.items()}


def write_scores(path: Path, data: dict, labels: np.ndarray | None, detectors: list[str], sort_by: str) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["producer"] = "clipbd.stages.reduce"
        f.attrs["detectors"] = np.array(detectors, dtype=h5py.string_dtype())
        f.attrs["ranked_by"] = sort_by  # the detector ranked.csv is sorted by
        f["index"] = data["index"]
        f["key"] = data["key"]
        if labels is not None:
            f["is_poison"] = labels
        if "score_batch" in data:
            f["score_batch"] = data["score_batch"]  # in-batch scoring: the batch of its group each sample was scored in
        for d in detectors:
            f[d] = data[f"scores/{d}"]  # one dataset per detector, position = global sample index


def write_ranked(path: Path, data: dict, labels: np.ndarray | None, detectors: list[str], sort_by: str,
                 index) -> None:
    """Most suspicious first by `sort_by` (ties in index order); `shard`/`member`: the tar file and
    image member each row was read from (member empty for an index written before clipbd recorded it)."""
    order = np.argsort(-data[f"scores/{sort_by}"], kind="stable")
    shard_ids, _ = index.locate(data["index"])
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "key", "shard", "member", "caption"] + (["is_poison"] if labels is not None else [])
                   + detectors)
        for i in order:
            g = int(data["index"][i])
            row = [g, _s(data["key"][i]), index.shards[shard_ids[i]], index.members[g], _s(data["caption"][i])]
            row += [int(labels[i])] if labels is not None else []
            w.writerow(row + [f"{data[f'scores/{d}'][i]:.6g}" for d in detectors])


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def load_embeddings(paths: list[Path], order: np.ndarray) -> dict[str, np.ndarray]:
    """image_emb, text_emb of every sample, rows in the order of global indices `order`."""
    cols: dict[str, list] = {"index": [], "image_emb": [], "text_emb": []}
    for p in paths:
        with h5py.File(p, "r") as f:
            if f["index"].shape[0]:
                for n in cols:
                    cols[n].append(f[n][()])
    emb = {n: np.concatenate(v) for n, v in cols.items()}
    pos = np.argsort(emb["index"], kind="stable")
    if not np.array_equal(emb["index"][pos], order):
        raise CoverageError("reduce: embeddings do not cover the scored samples; re-run extract")
    return {n: v[pos] for n, v in emb.items()}


def reference_set_scores(cfg: DictConfig, data: dict) -> dict[str, np.ndarray]:
    """With scoring=bank|global: the neighbourhood detectors and the isolation forest, scored here
    on every sample's embeddings (clipbd.scoring); {"scores/<name>": float64 [N]}."""
    scorer = scoring.build_scoring(cfg)
    detectors = scoring.by_need(build_detectors(cfg), *scoring.ON_REFERENCE)
    if scorer.per_group or not detectors:
        return {}
    index = load_index(cfg)
    emb = load_embeddings([p for p, _ in group_paths(cfg, len(index.shards))], data["index"])
    bank = None
    if scorer.heldout:
        path = bank_path(cfg)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: re-run extract (it embeds the held-out bank)")
        with h5py.File(path, "r") as f:
            bank = {n: f[n][()] for n in ("image_emb", "text_emb")}
    scores = scorer.score_all(emb, detectors, cfg.seed, bank)
    return {f"scores/{n}": s for n, s in scores.items()}


def check(cfg: DictConfig) -> None:
    """Before any stage runs: the detectors and their scoring (k against the bank size)."""
    scoring.build_scoring(cfg).check(build_detectors(cfg))


def main(cfg: DictConfig) -> dict[str, Path]:
    run_dir = Path(cfg.run_dir)
    out = {"scores": run_dir / "scores.h5", "ranked": run_dir / "ranked.csv", "metrics": run_dir / "metrics.json"}
    if not dist.is_main():
        return out
    index = load_index(cfg)
    built, scorer = build_detectors(cfg), scoring.build_scoring(cfg)
    data = gather(cfg, index, {n: d for n, d in built.items() if d.needs != "images"}, scorer)
    data |= reference_set_scores(cfg, data)
    detectors = list(cfg.detector.keys())
    sort_by = sort_detector(built, cfg.report.sort_by)
    plan = PoisonLookup.load(run_dir / "poison_plan.json")
    labels = plan.labels(len(index)) if len(plan.indices) else None
    write_scores(out["scores"], data, labels, detectors, sort_by)
    write_ranked(out["ranked"], data, labels, detectors, sort_by, index)
    log.info("reduce: ranked.csv sorted by %s (report.sort_by)%s", sort_by,
             f"; {len(index.skipped)} samples skipped while indexing are in skipped.csv" if index.skipped else "")
    if labels is None:
        update_metrics(run_dir, "detect/", {"detect/note": "no poison labels (nothing was poisoned, e.g. a scan "
                                                          "of unlabelled data): AUROC/AUPRC/FPR95 not computed"})
        log.info("reduce: %d samples scored; no poison labels, so no AUROC", len(index))
        return out
    scores = {d: data[f"scores/{d}"] for d in detectors}
    metrics = {}
    for d, s in scores.items():
        for name, v in detection_metrics(labels, s).items():
            metrics[f"detect/{d}/{name}"] = v
        log.info("detect/%s: AUROC %.4f  AUPRC %.4f  FPR95 %.4f", d, metrics[f"detect/{d}/auroc"],
                 metrics[f"detect/{d}/auprc"], metrics[f"detect/{d}/fpr95"])
    update_metrics(run_dir, "detect/", metrics)
    (run_dir / "plots").mkdir(exist_ok=True)
    out["roc"] = roc_plot(run_dir / "plots" / "roc.png", labels, scores)
    out["hist"] = score_histograms(run_dir / "plots" / "score_hist.png", labels, scores)
    return out
