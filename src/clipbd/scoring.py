"""Detector scoring for the extract and reduce stages: each configured detector is routed by what it
`needs` (an attribute of its config class), so adding a detector is a `conf/detector/` file and a
class, with no list of names here.

needs            detectors                        scored where, on what
"images"         CognitiveDistillation            extract: each image, with the model, while embedding
"neighbourhood"  Neighbourhood (kdist/lid/slof/   reduce, from the stored embeddings: the feature space
                 dao/lid_mom)                     against the reference set (`batch`: per scoring batch
"reference"      IsolationForest                  of each extraction group; `bank`, `global`: once)
"pairs"          CLIPScore                        reduce: each sample's image and caption embeddings
"training"       ABL                              reduce: the pretrain stage's per-sample losses

Only the detectors that need images are scored while embedding; everything else is a function of the
embeddings extract stores, so a detector or scoring change re-scores them without re-encoding (the
extract stage's key holds only the image detectors' settings).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections import defaultdict
from typing import Any, Callable, Iterator

import numpy as np
import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from clipbd.data.sources import TEST_SPLIT
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
from clipbd.registry import ConfigError, build, check_node
from clipbd.utils import derive_seed, rng

ON_REFERENCE = ("neighbourhood", "reference")  # scored against the reference set
log = logging.getLogger("clipbd")


def by_need(detectors: dict, *needs: str) -> dict:
    return {n: d for n, d in detectors.items() if d.needs in needs}


def build_scoring(cfg: DictConfig) -> "Scoring":
    """The scoring mode `scoring.reference` (a `_target_` node set by the `scoring` group,
    conf/scoring/{batch,bank,global}.yaml), given the `scoring.*` settings its signature names
    (the section holds every mode's settings, clipbd.config.ScoringConfig)."""
    node = OmegaConf.to_container(cfg.scoring.reference, resolve=True)
    check_node(node, "scoring.reference")
    params = inspect.signature(get_object(node["_target_"])).parameters
    settings = {k: v for k, v in OmegaConf.to_container(cfg.scoring, resolve=True).items() if k != "reference"}
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        settings = {k: v for k, v in settings.items() if k in params}
    return build({**settings, **node}, "scoring.reference")


def needs_of(node: DictConfig) -> str | None:
    """What the detector node's class `needs` (its `_target_` alone is read)."""
    return getattr(get_object(node._target_), "needs", None)


def image_detector_names(cfg: DictConfig) -> list[str]:
    """The configured detectors scored on the images while embedding (needs="images")."""
    return [n for n in cfg.detector if needs_of(cfg.detector[n]) == "images"]


def image_detectors(cfg: DictConfig) -> dict:
    return {n: build(cfg.detector[n], f"detector.{n}") for n in image_detector_names(cfg)}


def heldout_bank_keys(cfg: DictConfig) -> tuple[str, ...]:
    """The scoring keys extract reads when it embeds a held-out bank (scoring=bank with
    bank_source test or shards), else none."""
    uses = getattr(get_object(cfg.scoring.reference._target_), "uses_bank", False)
    if not uses or cfg.scoring.bank_source == "train":
        return ()
    test = TEST_SPLIT if cfg.scoring.bank_source == "test" else ()
    return ("scoring.reference", "scoring.bank_source", "scoring.bank_size", "seed") + test


def embedding_scores(emb: dict, detectors: dict, scorer: "Scoring", seed: int, run_dir) -> tuple[dict, np.ndarray]:
    """The scores of one extraction group's samples computed from its stored embeddings (every
    detector but those that need images): pair and training detectors, and the reference-set
    detectors when the scoring is per group (scoring=batch); each sample's scoring batch id."""
    n = len(emb["index"])
    here = {m: d for m, d in detectors.items()
            if d.needs in ("pairs", "training") or (scorer.per_group and d.needs in ON_REFERENCE)}
    if n == 0:
        return {m: np.empty(0) for m in here}, np.empty(0, dtype=np.int32)
    scores = pair_scores(emb, here) | training_scores(emb, here, run_dir)
    batch_id = np.zeros(n, dtype=np.int32)
    if scorer.per_group:
        ref_scores, batch_id = scorer.score_group(emb, here, seed)
        scores |= ref_scores
    return scores, batch_id


def detector_seed(seed: int, name: str) -> int:
    return derive_seed(seed, f"detector/{name}")


def resolve_index_checked(index: str, rows: int) -> str:
    try:
        return resolve_index(index, rows)
    except ValueError as e:
        raise ConfigError(str(e)) from None


# ----------------------------------------------------------------------------- reference sets


class Scoring:
    """What the neighbourhood detectors and the isolation forest score each sample against.
    `where`: the stage that scores them (extract per scoring batch, or reduce once every
    extraction group exists). `features`: image | text | image+text (query: image rows; reference:
    image and caption rows, as the paper)."""

    name = ""
    per_group = False  # scored per extraction group (in-batch) rather than once over every sample
    uses_bank = False  # whether a held-out bank may be embedded for it (scoring.bank_source)
    heldout = False  # whether extract embeds a held-out bank (shards/bank.h5)

    def __init__(self, features: str = "image"):
        if features not in FEATURES:
            raise ConfigError(f"scoring.features={features}: must be one of {', '.join(FEATURES)}")
        self.features = features

    def check(self, detectors: dict) -> None:
        """Fail before any model is loaded, naming the key, for settings the detectors cannot work with."""
        faithful = [n for n, d in by_need(detectors, "neighbourhood").items() if d.convention == "faithful"]
        if faithful and not self.per_group:
            raise ConfigError(f"detector.{faithful[0]}.convention=faithful reproduces the published in-batch "
                              f"arithmetic; with scoring={self.name} use convention=textbook")

    def _check_k(self, detectors: dict, size: int, key: str) -> None:
        """Every neighbourhood detector's k against the reference rows each sample has in a reference
        set of `size` samples (its own rows excluded), the k-NN engine's own rule."""
        per = 2 if self.features == "image+text" else 1  # image+text: an image and a caption row each
        for name, det in by_need(detectors, "neighbourhood").items():
            faithful = det.convention == "faithful"  # the published code reads the (k+1)-th neighbour
            if det.k + faithful > per * (size - 1):
                raise ConfigError(f"detector.{name}.k={det.k} needs {det.k + faithful} other rows but {key}={size} "
                                  f"leaves {per * (size - 1)} per sample (scoring.features={self.features}); "
                                  f"lower k or raise {key}")


class InBatch(Scoring):
    """Each sample against the other samples of its scoring batch (Huang et al., ICLR 2025, §3):
    a group's rows cut in index order into batches of about `batch_size`; scored by reduce, one
    extraction group at a time, from the stored embeddings."""

    name, per_group = "batch", True

    def __init__(self, batch_size: int = 1024, features: str = "image"):
        super().__init__(features)
        self.batch_size = int(batch_size)

    def check(self, detectors: dict) -> None:
        super().check(detectors)
        if self.batch_size < 2:
            raise ConfigError(f"scoring.batch_size={self.batch_size}: must be >= 2")
        self._check_k(detectors, self.batch_size, "scoring.batch_size")

    def score_group(self, emb: dict, detectors: dict, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Scores of every sample of one extraction group against the other samples of its scoring
        batch, and each sample's batch id."""
        n = len(emb["index"])
        n_batches = max(1, int(round(n / self.batch_size)))
        batch_id = np.zeros(n, dtype=np.int32)
        scores = {name: np.empty(n, dtype=np.float64) for name in by_need(detectors, *ON_REFERENCE)}
        for b, rows in enumerate(np.array_split(np.arange(n), n_batches)):
            batch_id[rows] = b
            space = feature_space(emb["image_emb"][rows], emb["text_emb"][rows], self.features)
            for name, s in score_space(space, detectors, seed).items():
                scores[name][rows] = s
        return scores, batch_id


class Bank(Scoring):
    """Every sample against a fixed bank of `bank_size` rows, scored by reduce: `bank_source=train`
    draws them (seeded) from the training samples, poisoned ones included as drawn, and a member
    excludes its own rows; `test` (the held-out test shards) or clean shards (a brace pattern, glob,
    directory or list) are embedded by extract into shards/bank.h5."""

    name, uses_bank = "bank", True

    def __init__(self, bank_size: int = 4096, bank_source: Any = "train", features: str = "image"):
        super().__init__(features)
        self.bank_size, self.bank_source = int(bank_size), bank_source
        self.heldout = bank_source != "train"

    def check(self, detectors: dict) -> None:
        super().check(detectors)
        if self.bank_size < 2:
            raise ConfigError(f"scoring.bank_size={self.bank_size}: must be >= 2")
        self._check_k(detectors, self.bank_size, "scoring.bank_size")

    def score_all(self, emb: dict, detectors: dict, seed: int, bank: dict | None = None) -> dict[str, np.ndarray]:
        """Every sample against the `bank` embeddings (held out) or, when None, `bank_size` samples
        drawn from `emb` with the seed (those samples exclude their own rows)."""
        space = feature_space(emb["image_emb"], emb["text_emb"], self.features)
        members = None
        if bank is None:
            members = draw_bank(len(space), self.bank_size, rng(seed, "bank"))
            bank = {k: emb[k][members] for k in ("image_emb", "text_emb")}
        bank_space = feature_space(bank["image_emb"], bank["text_emb"], self.features)
        log.info("scoring %d samples against a bank of %d (%s)", len(space), len(bank_space),
                 "drawn from the training samples" if members is not None else "held out")
        scores: dict[str, np.ndarray] = {}
        for name, det in by_need(detectors, "neighbourhood").items():
            try:
                scores[name] = bank_scores(space, bank_space, k=det.k, methods=(det.method,),
                                           members=members)[det.method]
            except ValueError as e:
                raise ConfigError(f"detector {name}: {e} (scoring.bank_size={len(bank_space)})") from None
        for name, det in by_need(detectors, "reference").items():
            scores[name] = det.score(space.query, bank_space.reference, detector_seed(seed, name))
        return scores


class Global(Scoring):
    """Every sample against every training sample (own rows excluded), scored by reduce: a faiss
    k-NN graph built once for the largest k, `index` flat (exact) | ivf (approximate) | auto (flat up
    to 200k rows); `ivf_nlist` inverted lists (default about 4 sqrt(rows)), `ivf_nprobe` searched."""

    name = "global"

    def __init__(self, index: str = "auto", ivf_nlist: int | None = None, ivf_nprobe: int = 32,
                 features: str = "image"):
        super().__init__(features)
        self.index, self.ivf_nlist, self.ivf_nprobe = index, ivf_nlist, int(ivf_nprobe)
        resolve_index_checked(index, 1)

    def score_all(self, emb: dict, detectors: dict, seed: int, bank: dict | None = None) -> dict[str, np.ndarray]:
        space = feature_space(emb["image_emb"], emb["text_emb"], self.features)
        nbr = by_need(detectors, "neighbourhood")
        scores: dict[str, np.ndarray] = {}
        if nbr:
            t, m = len(space.offsets), space.reference.shape[0]
            kmax = max(d.k for d in nbr.values())
            if kmax > m - t:
                raise ConfigError(f"detector k={kmax} exceeds the {m - t} other rows of the {len(space)} samples")
            index = resolve_index_checked(self.index, m)
            log.info("global kNN graph of %d reference rows, k=%d, %s index", m, kmax, index)
            graph = candidate_graph(space.reference, kmax + t, index, nlist=self.ivf_nlist, nprobe=self.ivf_nprobe,
                                    seed=derive_seed(seed, "ivf"))
            for name, det in nbr.items():
                scores[name] = global_scores(space, k=det.k, methods=(det.method,), graph=graph)[det.method]
        for name, det in by_need(detectors, "reference").items():
            scores[name] = det.score(space.query, space.reference, detector_seed(seed, name))
        return scores


def score_space(space: FeatureSpace, detectors: dict, seed: int) -> dict[str, np.ndarray]:
    """Neighbourhood and isolation-forest scores of every sample of one scoring batch `space`
    against its own reference rows (own rows excluded)."""
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
            raise ConfigError(f"detector {names[0]}: {e} — {len(space)} samples in this scoring batch "
                              f"(scoring.batch_size)") from None
        scores.update({n: res[detectors[n].method] for n in names})
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
