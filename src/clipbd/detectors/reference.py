"""Reference sets beyond one batch: a fixed `bank` of reference rows, and the `global` set of every
training sample searched with faiss (docs/detectors.md says when each is right).

A `FeatureSpace` says what is scored against what. Each sample has one query row; the reference rows
are one block of n rows (features "image" or "text") or two ("image+text": the image rows, then the
caption rows, as the published code's image-text reference). Sample i is reference row i + o for each
o in `offsets`; those rows are excluded from its own neighbourhood (its own image and its own caption).
A reference point's own statistics (r_k(o), LID(o)) exclude only the point itself, as in `knn_scores`.

Only the textbook convention is offered here: the published arithmetic (`convention="faithful"`) is
defined for one batch scored against itself, and its index quirks have no meaning for other sets.

- bank:   `bank_scores` scores every sample against the bank's reference rows with `knn_scores`
          (exact). Samples that are themselves in the bank exclude their own rows.
- global: `global_scores` builds the k-NN graph of all reference rows once (faiss `IndexFlatL2` or
          `IndexIVFFlat`), re-ranks each row's candidates with exact float64 distances, computes every
          reference point's r_k and LID once, and scores each sample from its own neighbours. With the
          flat index it equals `knn_scores(query, reference, self_offset=offsets)`; with IVF the
          neighbours are approximate (recall measured in experiments/bench/global_cpu.md).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from clipbd.detectors.exact import exact_d2, order_candidates
from clipbd.detectors.knn import (
    distance_floor,
    exact_knn,
    knn_scores,
    reference_stats,
    scores_from_neighbours,
)

FEATURES = ("image", "text", "image+text")
INDEXES = ("auto", "flat", "ivf")
AUTO_IVF_ROWS = 200_000
IVF_TRAIN_PER_LIST = 40  # k-means training rows per IVF list (a seeded sample of the reference rows)
IVF_KMEANS_ITERS = 10  # k-means iterations of the IVF coarse quantizer (faiss' default 25 buys little)  # index="auto": exact flat search below this many reference rows, IVF above
_EXTRA = 8  # spare candidates per row for the exact float64 re-ranking of faiss' float32 distances
_SEARCH_ROWS = 1 << 16  # rows per faiss search call (bounded memory, progress in the log)
log = logging.getLogger("clipbd")


@dataclass
class FeatureSpace:
    """query [n, d]: one row per sample; reference [t*n, d]; sample i is reference row i + o, o in offsets."""

    query: np.ndarray
    reference: np.ndarray
    offsets: tuple[int, ...]

    def __len__(self) -> int:
        return self.query.shape[0]


def feature_space(image_emb: np.ndarray, text_emb: np.ndarray | None, kind: str) -> FeatureSpace:
    """The rows scored and the reference rows for `scoring.features` = image | text | image+text."""
    if kind not in FEATURES:
        raise ValueError(f"scoring.features={kind}: must be one of {', '.join(FEATURES)}")
    if kind != "image" and text_emb is None:
        raise ValueError(f"scoring.features={kind} needs caption embeddings")
    n = image_emb.shape[0]
    if kind == "image":
        return FeatureSpace(image_emb, image_emb, (0,))
    if kind == "text":
        return FeatureSpace(text_emb, text_emb, (0,))
    return FeatureSpace(image_emb, np.concatenate([image_emb, text_emb]), (0, n))


def _check(k: int, methods, available: int, where: str) -> tuple[str, ...]:
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k={k!r}: k must be an integer >= 1")
    if k == 1 and {"lid", "lid_mom", "dao"} & set(methods):
        raise ValueError("k=1: LID (and DAO, which uses it) is undefined for k=1; use k >= 2")
    if k > available:
        raise ValueError(f"k={k} exceeds the {available} rows of the {where} available to each sample "
                         "(its own rows excluded); lower k or use a larger reference set")
    return methods


# ----------------------------------------------------------------------------- bank


def bank_scores(space: FeatureSpace, bank: FeatureSpace, *, k: int = 16,
                methods=("kdist", "lid", "slof", "dao"), members: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Score every sample of `space` against the reference rows of `bank` (exact, textbook).

    members: [b] the sample row (in `space`) of each bank row when the bank was drawn from the samples
    themselves, or None for a held-out bank. A member is scored against the bank minus its own rows.
    Returns {method: float64 [n]}, higher = more suspicious.
    """
    methods = _check(k, methods, bank.reference.shape[0] - len(bank.offsets), "bank")
    n = len(space)
    out = {m: np.empty(n, dtype=np.float64) for m in methods}
    inside = np.zeros(n, dtype=bool)
    if members is not None:
        members = np.asarray(members, dtype=np.int64)
        if len(members) != len(bank) or len(np.unique(members)) != len(members):
            raise ValueError(f"bank members: {len(members)} sample rows for a bank of {len(bank)} (unique)")
        inside[members] = True
        res = knn_scores(bank.query, bank.reference, k=k, methods=methods, self_offset=bank.offsets)
        for m in methods:
            out[m][members] = res[m]
    if (~inside).any():
        res = knn_scores(space.query[~inside], bank.reference, k=k, methods=methods)
        for m in methods:
            out[m][~inside] = res[m]
    return out


def draw_bank(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted rows of a bank of `size` samples drawn without replacement from n (all if size >= n)."""
    if size < 1:
        raise ValueError(f"scoring.bank_size={size}: must be >= 1")
    return np.arange(n) if size >= n else np.sort(rng.choice(n, size=size, replace=False))


# ----------------------------------------------------------------------------- global (faiss)


def resolve_index(index: str, rows: int) -> str:
    if index not in INDEXES:
        raise ValueError(f"scoring.index={index}: must be one of {', '.join(INDEXES)}")
    return index if index != "auto" else ("flat" if rows <= AUTO_IVF_ROWS else "ivf")


def default_nlist(rows: int) -> int:
    """IVF lists: about 4 sqrt(rows) (faiss' guideline), at least 39 training points per list."""
    return int(max(1, min(round(4 * math.sqrt(rows)), rows // 39)))


def build_index(x: np.ndarray, index: str = "flat", *, nlist: int | None = None, nprobe: int = 32, seed: int = 0):
    """A faiss index over x [m, d] float32 (already centred). IVF: k-means on a seeded sample."""
    import faiss  # optional at import time: only the global reference set needs it

    m, d = x.shape
    if index == "flat":
        idx = faiss.IndexFlatL2(d)
    else:
        nlist = nlist or default_nlist(m)
        if not 1 <= nlist <= m:
            raise ValueError(f"scoring.ivf_nlist={nlist}: must be in 1..{m} (the number of reference rows)")
        idx = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
        idx.cp.seed = int(seed) % (2**31)
        idx.cp.niter = IVF_KMEANS_ITERS
        rng = np.random.default_rng(seed)
        per = IVF_TRAIN_PER_LIST * nlist
        sample = x if m <= per else x[np.sort(rng.choice(m, per, replace=False))]
        idx.train(sample)
        idx.nprobe = min(int(nprobe), nlist)
    idx.add(x)
    return idx


def candidate_graph(x: np.ndarray, kk: int, index: str = "flat", *, nlist: int | None = None,
                    nprobe: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The kk nearest rows of every row of x [m, d] (the row itself usually first), by exact float64
    distance (from x as given, float32 or float64) among faiss' kk + _EXTRA float32 candidates; ties by
    index.

    Returns (dist float64 [m, kk] ascending, idx int64 [m, kk]). Rows for which faiss finds fewer than
    kk candidates (IVF lists too small for nprobe) are searched exactly.
    """
    x = np.asarray(x)
    x = x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)
    m = x.shape[0]
    bad = np.nonzero(~np.isfinite(x).all(1))[0]
    if len(bad):  # faiss would search NaN rows silently
        raise ValueError(f"reference has NaN/inf features in {len(bad)} row(s), e.g. rows {bad[:5].tolist()}; "
                         "drop or repair those samples before scoring")
    kk = min(kk, m)
    centred = np.ascontiguousarray(x - x.mean(0, dtype=np.float64), dtype=np.float32)  # less cancellation
    faiss_index = build_index(centred, index, nlist=nlist, nprobe=nprobe, seed=seed)
    n_cand = min(m, kk + _EXTRA)
    dist = np.empty((m, kk), dtype=np.float64)
    idx = np.empty((m, kk), dtype=np.int64)
    xt = torch.from_numpy(x)
    for s in range(0, m, _SEARCH_ROWS):
        e = min(m, s + _SEARCH_ROWS)
        _, cand = faiss_index.search(centred[s:e], n_cand)  # [rows, n_cand], -1 = not found
        dist[s:e], idx[s:e] = _rerank(xt, torch.arange(s, e), torch.from_numpy(cand), kk)
        if m > _SEARCH_ROWS:
            log.info("global kNN: %d / %d rows searched (%s)", e, m, index)
    missing = np.nonzero(~np.isfinite(dist[:, -1]))[0]
    if len(missing):  # too few candidates found: exact search for those rows
        log.info("global kNN: %d rows had fewer than %d IVF candidates; searched exactly", len(missing), kk)
        d_ex, i_ex = exact_knn(x[missing], x, k=kk)
        dist[missing], idx[missing] = d_ex.numpy(), i_ex.numpy()
    return dist, idx


def _rerank(x: torch.Tensor, rows: torch.Tensor, cand: torch.Tensor, kk: int):
    """Exact float64 distances from x[rows] to x[cand] [r, c] (-1 = none), the kk nearest, ties by
    index (the exact engine's re-ranking, clipbd.detectors.exact)."""
    valid = cand >= 0
    d2 = exact_d2(x, x[rows], cand.clamp(min=0))
    d2[~valid] = math.inf
    safe = torch.where(valid, cand, torch.iinfo(torch.int64).max)  # invalid last among ties
    d2, safe = order_candidates(d2, safe)
    return d2[:, :kk].sqrt().numpy(), safe[:, :kk].numpy()


def select_neighbours(dist: np.ndarray, idx: np.ndarray, excluded: np.ndarray, k: int):
    """First k candidates of each row that are not in its excluded rows [r, e]; (dist, idx) [r, k]."""
    hit = (idx[:, :, None] == excluded[:, None, :]).any(-1)  # [r, kk]
    key = np.where(hit, np.inf, dist)
    order = np.argsort(key, axis=1, kind="stable")[:, :k]  # candidates are already (dist, idx)-sorted
    d, i = np.take_along_axis(dist, order, 1), np.take_along_axis(idx, order, 1)
    if np.take_along_axis(hit, order, 1).any():
        raise ValueError(f"fewer than k={k} candidates left after excluding each row's own rows")
    return d, i


def global_scores(space: FeatureSpace, *, k: int = 16, methods=("kdist", "lid", "slof", "dao"),
                  index: str = "auto", nlist: int | None = None, nprobe: int = 32, seed: int = 0,
                  graph: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Score every sample against all reference rows (own rows excluded), textbook convention.

    index: "flat" (exact), "ivf" (approximate, `nlist` lists, `nprobe` probed; k-means seeded by
    `seed`) or "auto" (flat up to AUTO_IVF_ROWS reference rows). graph: a precomputed
    `candidate_graph` of space.reference with at least k + len(offsets) columns (to share one search
    between detectors with different k). Returns {method: float64 [n]}, higher = more suspicious.
    """
    ref = space.reference
    n, m, t = len(space), ref.shape[0], len(space.offsets)
    methods = _check(k, methods, m - t, "global reference set")
    if graph is None:
        graph = candidate_graph(ref, k + t, resolve_index(index, m), nlist=nlist, nprobe=nprobe, seed=seed)
    dist, idx = graph
    if dist.shape[1] < k + t:
        raise ValueError(f"graph has {dist.shape[1]} neighbours per row; k={k} needs {k + t}")
    floor = distance_floor(ref)
    # reference points: k nearest other rows (self excluded), statistics computed once per row
    r_dist, _ = select_neighbours(dist, idx, np.arange(m)[:, None], k)
    rk_tab, lid_tab = reference_stats(torch.from_numpy(r_dist), floor=floor)
    # queries: sample i is reference row i (first block); its own rows i + o are excluded
    own = np.arange(n)[:, None] + np.asarray(space.offsets)[None, :]
    q_dist, q_idx = select_neighbours(dist[:n], idx[:n], own, k)
    q_idx_t = torch.from_numpy(q_idx)
    return scores_from_neighbours(torch.from_numpy(q_dist), rk_tab[q_idx_t], lid_tab[q_idx_t], methods, floor=floor)


def neighbour_recall(graph_idx: np.ndarray, x: np.ndarray, rows: np.ndarray, k: int) -> float:
    """Mean fraction of each sampled row's exact k nearest other rows found in graph_idx[rows, :k+1]."""
    _, exact = exact_knn(x[rows], x, k=k + 1)
    exact = exact.numpy()
    hits = 0
    for r, want, got in zip(rows, exact, graph_idx[rows, : k + 1]):
        hits += len(set(want[want != r][:k]) & set(got[got != r]))
    return hits / (len(rows) * k)
