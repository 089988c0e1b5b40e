"""Stage `report`: the curator's page of a scored run — `report/index.html` (self-contained: the
thumbnails are embedded) and `report/clusters.csv`. Runs after `reduce` by default and alone on a
finished run (`stages=[report]`). Reads only the top `report.top_n` of scores.h5, their rows of the
extraction files, one streaming pass over the image embeddings for the clusters' corpus shares, and
the thumbnails' tar members (clipbd.curation.report). Writes no metric and touches no other file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
from omegaconf import DictConfig

from clipbd import dist, tracking
from clipbd.registry import build_attack
from clipbd.attacks.plan import PoisonLookup
from clipbd.curation import report as rep
from clipbd.curation.html import render
from clipbd.curation.thumbs import data_uri, png_bytes, read_images
from clipbd.data.sources import load_index
from clipbd.detectors.ranking import sort_detector
from clipbd.models import factory
from clipbd.registry import ConfigError, build
from clipbd.utils import atomic_path, read_json

DEPENDS = ("report", "attack", "detector")
UPSTREAM = ("data", "poison", "reduce")
UPSTREAM_IF = {"invert": "invert.caption"}  # an inversion run before it is shown on the page
log = logging.getLogger("clipbd")


def _check(rc) -> None:
    if rc.top_n < 1:
        raise ConfigError(f"report.top_n={rc.top_n}: need ≥ 1 samples to show")
    if not -1.0 <= rc.cluster_threshold <= 1.0:
        raise ConfigError(f"report.cluster_threshold={rc.cluster_threshold}: a cosine, in [-1, 1] (e.g. 0.9)")
    if rc.caption_min_count < 2:
        raise ConfigError(f"report.caption_min_count={rc.caption_min_count}: need ≥ 2 (one sample is no shared caption)")
    if rc.bins < 2:
        raise ConfigError(f"report.bins={rc.bins}: need ≥ 2 histogram bins")


def _sort_by(cfg: DictConfig, scores_h5: Path) -> str:
    """The detector ranked.csv was sorted by (scores.h5 says), else the report.sort_by rule."""
    with h5py.File(scores_h5, "r") as f:
        ranked = f.attrs.get("ranked_by")
    if ranked is not None and (cfg.report.sort_by is None or cfg.report.sort_by == ranked):
        return str(ranked)
    return sort_detector({n: build(node, f"detector.{n}") for n, node in cfg.detector.items()}, cfg.report.sort_by)


def main(cfg: DictConfig) -> dict[str, Path]:
    run_dir, rc = Path(cfg.run_dir), cfg.report
    out_dir = run_dir / "report"
    out = {"html": out_dir / "index.html", "clusters": out_dir / "clusters.csv"}
    if not dist.is_main():
        return out
    _check(rc)
    scores_h5 = run_dir / "scores.h5"
    extract_files = sorted((run_dir / "shards").glob("extract-*.h5"))
    if not scores_h5.exists() or not extract_files:
        raise FileNotFoundError(f"{scores_h5} or shards/extract-*.h5 missing: run extract and reduce first "
                                "(stages=[extract,reduce,report])")
    index = load_index(cfg)
    sort_by = _sort_by(cfg, scores_h5)
    top = rep.load_top(scores_h5, extract_files, sort_by, min(rc.top_n, len(index)))
    top.cluster = rep.cluster_rows(top.image_emb, top.caption, rc.cluster_threshold, rc.caption_min_count)
    captions = rep.shared_captions(top.caption, top.cluster, rc.caption_min_count)
    counts, corpus = rep.corpus_counts(extract_files, rep.centroids(top.image_emb, top.cluster), rc.cluster_threshold,
                                       captions)
    clusters = rep.summarise(top, counts, corpus)
    with h5py.File(scores_h5, "r") as f:
        labels = f["is_poison"] if "is_poison" in f else None
        hists = {d: rep.histogram(f[d], rc.bins, labels=labels) for d in top.scores}
    bundle = factory.create(cfg.model, device="cpu")  # only its input transform (resolution) is used
    images = read_images(index, top.index, bundle.to_tensor(), PoisonLookup.load(run_dir / "poison_plan.json"),
                         build_attack(cfg))
    pngs = {g: png_bytes(im) for g, im in images.items()}
    metrics = read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").exists() else {}
    html = render(title=f"clipbd report — {cfg.name} ({run_dir.name})", top=top, clusters=clusters,
                  thumbs={g: data_uri(p) for g, p in pngs.items()}, sort_by=sort_by, corpus_size=corpus,
                  threshold=rc.cluster_threshold, hists=hists, metrics=metrics,
                  inversion=rep.read_inversions(run_dir) if cfg.invert.caption is not None else ())
    out_dir.mkdir(exist_ok=True)
    with atomic_path(out["html"]) as tmp:
        Path(tmp).write_text(html, encoding="utf-8")
    rep.write_clusters_csv(out["clusters"], clusters, top)
    tracking.log_report(top, clusters, pngs, rc.wandb_thumbs)
    log.info("report: top %d by %s in %d clusters (%d of more than one) -> %s", len(top.index), sort_by,
             len(clusters), sum(c.size_top > 1 for c in clusters), out["html"])
    return out
