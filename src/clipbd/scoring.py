"""Detector scoring for the extract and reduce stages: each configured detector is routed by what it
`needs` (an attribute of its config class), so adding a detector is a `conf/detector/` file and a
class, with no list of names here.

needs            detectors                        scored where, on what
"neighbourhood"  Neighbourhood (kdist/lid/slof/   the feature space against the reference set: `batch`
                 dao/lid_mom)                     in extract (per scoring batch); `bank` and `global`
"reference"      IsolationForest                  in reduce, once every extraction group exists
"pairs"          CLIPScore                        extract: each sample's image and caption embeddings
"images"         CognitiveDistillation            extract: each image, with the model, while embedding
"training"       ABL                              extract: the pretrain stage's per-sample losses

Why bank/global scoring happens in reduce: a sample's neighbours there come from every extraction
group (global) or from a bank drawn across the whole dataset, so it needs all embeddings first; the
extraction groups stay independent (one job-array task each), and one reduce does the rest.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from typing import Callable, Iterator

import numpy as np
import torch
from omegaconf import DictConfig

from clipbd.detectors.knn import knn_scores
from clipbd.detectors.reference import (
    FEATURES,
    FeatureSpace,
    bank_scores,
    candidate_graph,
    draw_bank,
    feature_space,
    global_scores,
    resolve_index,
)
from clipbd.registry import ConfigError
from clipbd.utils import derive_seed, rng

REFERENCES = ("batch", "bank", "global")
ON_REFERENCE = ("neighbourhood", "reference")  # scored against the reference set
log = logging.getLogger("clipbd")


def by_need(detectors: dict, *needs: str) -> dict:
    return {n: d for n, d in detectors.items() if d.needs in needs}


def check(sc: DictConfig, detectors: dict) -> None:
    """Fail early, naming the key, for scoring settings the detectors cannot work with."""
    if sc.reference not in REFERENCES:
        raise ConfigError(f"scoring.reference={sc.reference}: must be one of {', '.join(REFERENCES)}")
    if sc.features not in FEATURES:
        raise ConfigError(f"scoring.features={sc.features}: must be one of {', '.join(FEATURES)}")
    faithful = [n for n, d in by_need(detectors, "neighbourhood").items() if d.convention == "faithful"]
    if faithful and sc.reference != "batch":
        raise ConfigError(f"detector.{faithful[0]}.convention=faithful reproduces the published in-batch "
                          f"arithmetic; with scoring.reference={sc.reference} use convention=textbook")
    if sc.reference == "bank" and sc.bank_size < 2:
        raise ConfigError(f"scoring.bank_size={sc.bank_size}: must be >= 2")
    resolve_index_checked(sc.index, 1)


def resolve_index_checked(index: str, rows: int) -> str:
    try:
        return resolve_index(index, rows)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def detector_seed(seed: int, name: str) -> int:
    return derive_seed(seed, f"detector/{name}")


# ----------------------------------------------------------------------------- against a reference set


def score_space(space: FeatureSpace, detectors: dict, seed: int, in_batch: bool) -> dict[str, np.ndarray]:
    """Neighbourhood and isolation-forest scores of every sample of `space` against its own reference
    rows (own rows excluded): one scoring batch, or, with in_batch=False, the bank itself."""
    scores: dict[str, np.ndarray] = {}
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, det in by_need(detectors, "neighbourhood").items():
        groups[det.group].append(name)
    alone = space.reference is space.query  # image or text only: the plain in-batch call
    for (k, convention), names in groups.items():
        methods = tuple(dict.fromkeys(detectors[n].method for n in names))
        try:
            res = knn_scores(space.query, None if alone else space.reference, k=k, methods=methods,
                             convention=convention, self_offset=None if alone else space.offsets)
        except ValueError as e:
            where = "scoring batch (scoring.batch_size)" if in_batch else "bank (scoring.bank_size)"
            raise ConfigError(f"detector {names[0]}: {e} — {len(space)} samples in this {where}") from None
        scores.update({n: res[detectors[n].method] for n in names})
    for name, det in by_need(detectors, "reference").items():
        scores[name] = det.score(space.query, space.reference, detector_seed(seed, name))
    return scores


def score_in_batch(emb: dict, detectors: dict, sc: DictConfig, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Scores of every sample against the other samples of its scoring batch (rows cut in order into
    about `sc.batch_size`), and each sample's batch id."""
    n = len(emb["index"])
    n_batches = max(1, int(round(n / sc.batch_size)))
    batch_id = np.zeros(n, dtype=np.int32)
    scores = {name: np.empty(n, dtype=np.float64) for name in by_need(detectors, *ON_REFERENCE)}
    for b, rows in enumerate(np.array_split(np.arange(n), n_batches)):
        batch_id[rows] = b
        space = feature_space(emb["image_emb"][rows], emb["text_emb"][rows], sc.features)
        for name, s in score_space(space, detectors, seed, in_batch=True).items():
            scores[name][rows] = s
    return scores, batch_id


def score_bank(emb: dict, bank: dict | None, detectors: dict, sc: DictConfig, seed: int) -> dict[str, np.ndarray]:
    """Every sample against a bank: `bank` embeddings (held out) or, when None, `sc.bank_size` samples
    drawn from `emb` with the seed (those samples exclude their own rows)."""
    space = feature_space(emb["image_emb"], emb["text_emb"], sc.features)
    members = None
    if bank is None:
        members = draw_bank(len(space), sc.bank_size, rng(seed, "bank"))
        bank = {k: emb[k][members] for k in ("image_emb", "text_emb")}
    bank_space = feature_space(bank["image_emb"], bank["text_emb"], sc.features)
    log.info("scoring %d samples against a bank of %d (%s)", len(space), len(bank_space),
             "drawn from the training samples" if members is not None else "held out")
    scores: dict[str, np.ndarray] = {}
    for name, det in by_need(detectors, "neighbourhood").items():
        scores[name] = _bank_one(space, bank_space, det, members, name)
    for name, det in by_need(detectors, "reference").items():
        scores[name] = det.score(space.query, bank_space.reference, detector_seed(seed, name))
    return scores


def _bank_one(space, bank_space, det, members, name) -> np.ndarray:
    try:
        return bank_scores(space, bank_space, k=det.k, methods=(det.method,), members=members)[det.method]
    except ValueError as e:
        raise ConfigError(f"detector {name}: {e} (scoring.bank_size={len(bank_space)})") from None


def score_global(emb: dict, detectors: dict, sc: DictConfig, seed: int) -> dict[str, np.ndarray]:
    """Every sample against every training sample (faiss k-NN graph built once for the largest k)."""
    space = feature_space(emb["image_emb"], emb["text_emb"], sc.features)
    nbr = by_need(detectors, "neighbourhood")
    scores: dict[str, np.ndarray] = {}
    if nbr:
        t, m = len(space.offsets), space.reference.shape[0]
        kmax = max(d.k for d in nbr.values())
        if kmax > m - t:
            raise ConfigError(f"detector k={kmax} exceeds the {m - t} other rows of the {len(space)} samples")
        index = resolve_index_checked(sc.index, m)
        log.info("global kNN graph of %d reference rows, k=%d, %s index", m, kmax, index)
        graph = candidate_graph(space.reference, kmax + t, index, nlist=sc.ivf_nlist, nprobe=sc.ivf_nprobe,
                                seed=derive_seed(seed, "ivf"))
        for name, det in nbr.items():
            scores[name] = global_scores(space, k=det.k, methods=(det.method,), graph=graph)[det.method]
    for name, det in by_need(detectors, "reference").items():
        scores[name] = det.score(space.query, space.reference, detector_seed(seed, name))
    return scores


# ----------------------------------------------------------------------------- per-sample detectors


def pair_scores(emb: dict, detectors: dict) -> dict[str, np.ndarray]:
    return {n: d.score_pairs(emb["image_emb"], emb["text_emb"]) for n, d in by_need(detectors, "pairs").items()}


def training_scores(emb: dict, detectors: dict, run_dir) -> dict[str, np.ndarray]:
    return {n: d.score_training(run_dir, emb["index"]) for n, d in by_need(detectors, "training").items()}


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """Parameters without gradient for the duration (mask optimisation needs input gradients only)."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


def image_scorer(bundle, detectors: dict, seed: int, unit: str, device: str) -> Callable | None:
    """fn(images [b, 3, H, W] in [0, 1]) -> {name: float64 [b]} for the detectors that need images,
    each with its own noise stream (seeded per extraction unit, so groups are order-independent)."""
    dets = by_need(detectors, "images")
    if not dets:
        return None
    gens = {n: torch.Generator(device=device).manual_seed(derive_seed(seed, f"detector/{n}/{unit}")) for n in dets}

    def encode(x: torch.Tensor) -> torch.Tensor:
        return bundle.model.encode_image(bundle.normalize(x))

    def score(images: torch.Tensor) -> dict[str, np.ndarray]:
        with torch.enable_grad(), frozen(bundle.model):
            return {n: d.score_images(encode, images, gens[n]).numpy() for n, d in dets.items()}

    return score
