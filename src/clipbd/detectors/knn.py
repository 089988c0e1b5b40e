"""Neighbourhood detectors of Huang et al., ICLR 2025: k-distance, LID, SLOF and DAO.

All scores are pure functions of feature matrices: `knn_scores(query, reference)` returns one score per
query row, higher = more suspicious. Distances are Euclidean; neighbours of a point never include the
point itself.

Notation (``convention="textbook"``, the default). For a point p, r_i(p) is the distance to its i-th
nearest reference point other than itself (1-indexed, ties broken by reference index); N_k(p) are those
k points.

- k-distance      kdist(q) = r_k(q)
- LID, MLE        LID(q) = -( (1/k) sum_{i=1..k} ln(r_i(q) / r_k(q)) )^-1   (Levina & Bickel 2004, in
                  the k-term form of Amsaleg et al. 2015)
- LID, MoM        lid_mom(q) = m / (r_k(q) - m),  m = (1/k) sum_{i=1..k} r_i(q)   (Amsaleg et al.)
- SLOF            (1/k) sum_{o in N_k(q)} r_k(q) / r_k(o)       (simplified LOF, Schubert et al. 2014)
- DAO             (1/k) sum_{o in N_k(q)} (r_k(q) / r_k(o))^LID(o)   (Anderberg et al. 2024,
                  "Dimensionality-aware outlier detection")

r_k(o) and LID(o) of a neighbour o are always computed within the reference set with o itself excluded.
With ``reference=None`` the batch is its own reference (the paper's in-batch mode) and each query row is
excluded from its own neighbourhood. With a separate ``reference`` nothing is excluded for the queries,
unless ``self_offset`` says where the queries sit inside the reference (a batch gathered across ranks:
query row i is reference row ``self_offset + i``; a sequence of offsets excludes several rows per query,
e.g. an image's own embedding and its own caption's embedding).

Degenerate inputs (textbook):
- non-finite features, k < 1, k larger than the number of available neighbours, unknown methods or
  est_type: ``ValueError`` naming the value and the fix.
- k = 1 with "lid", "lid_mom" or "dao": ``ValueError`` (the k-th term of the estimator is always
  ln(1) = 0, so LID is undefined; use k >= 2).
- duplicate points (zero distances): distances are clamped below at ``DIST_FLOOR_REL`` times the RMS
  spread of the reference (distance of its rows to their mean). Ratios between clamped distances are 1,
  so a point inside a cluster of more than k exact duplicates gets SLOF = DAO = 1 and kdist = the floor.
- all k neighbour distances equal (e.g. the k neighbours are duplicates of each other): the MLE and MoM
  estimates diverge; LID is capped at ``LID_MAX``.
- DAO is evaluated in log space (log-sum-exp) and saturates at the largest float64 (~1.8e308) instead
  of overflowing (a far outlier whose neighbours have LID ~300 reaches ratio^300 quickly); saturated
  points tie at the top of the ranking.
Every output is finite.

``convention="faithful"`` reproduces the numbers of the published implementation
(github.com/HanxunH/Detect-CLIP-Backdoor-Samples, ``backdoor_sample_detector/{k_distance,lid_detection,
slof,dao}.py``) for one batch scored against itself (or, with ``reference`` + ``self_offset``, the
published ``gather_distributed`` / image-text arithmetic). It differs from textbook as follows:
1. The query's own k-distance is r_{k+1}(q) (column k of the 0-indexed, self-excluded sorted row), used
   for kdist, for the SLOF/DAO numerator, and as the LID denominator: LID(q) = -k / sum_{i=1..k}
   ln(r_i(q)/r_{k+1}(q) + 1e-4); MoM uses m = mean(r_1..r_k) and r_{k+1}.
2. Every log argument carries ``+ 1e-4``.
3. A neighbour's LID comes from its sorted row *with* the zero self-distance kept: -k / (ln(1e-4) +
   sum_{i=1..k-1} ln(r_i(o)/r_k(o) + 1e-4)) (MoM: m = (0 + r_1 + ... + r_{k-1}) / k, m / (r_k - m)).
   The neighbour's k-distance is column k of that row, i.e. r_k(o) (textbook).
4. Neighbour indices are positions in the self-masked row used directly as sample indices, so every
   neighbour whose index is above the query's excluded row(s) is replaced by the sample one (or, with
   several excluded rows, that many) places earlier - possibly the query itself.
5. DAO is the log-mean: (1/k) sum_o LID(o) * ln(r_{k+1}(q) / r_k(o)) - the log of the geometric mean
   rather than the arithmetic mean of the ratio powers.
6. Non-finite scores are replaced as published: NaN -> 1000, +inf -> 1000, -inf -> 0. The published
   DAO and SLOF do this; the published k-distance and LID return raw values, so on degenerate inputs
   (duplicates) their NaN/inf become 1000/0 here. No distance clamping in this mode.
Not reproduced: the published default ``compute_mode`` uses float32 matrix products, whose cancellation
error makes the zero self-distance slightly positive and perturbs all distances (the size on random
features is in experiments/bench/knn_cpu.md); we match the published code run with ``compute_mode=
"donot_use_mm_for_euclid_dist"`` in float64. Ties are broken by index (published ``torch.sort`` is not
stable), which only matters for exact duplicates.

The neighbours come from the exact search of `clipbd.detectors.exact` (float32 candidates, float64
re-ranking, certified equal to float64 brute force).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from clipbd.detectors.exact import DIST_FLOOR_REL, Space, as_features, exact_knn, exclusions, search

__all__ = ["CONVENTIONS", "DIST_FLOOR_REL", "LID_MAX", "METHODS", "exact_knn", "knn_scores"]

METHODS = ("kdist", "lid", "lid_mom", "slof", "dao")
CONVENTIONS = ("textbook", "faithful")
EST_TYPES = ("mle", "mom")
LID_MAX = 1e6  # cap for LID when all k neighbour distances are equal (estimator diverges)
FAITHFUL_EPS = 1e-4  # the published code adds this inside every log
FAITHFUL_FILL = {"nan": 1000.0, "posinf": 1000.0, "neginf": 0.0}  # published nan_to_num


def knn_scores(
    query,
    reference=None,
    *,
    k: int = 16,
    methods: Sequence[str] = ("kdist", "lid", "slof", "dao"),
    convention: str = "textbook",
    chunk_size: int | None = None,
    self_offset: int | Sequence[int] | None = None,
    est_type: str = "mle",
) -> dict[str, np.ndarray]:
    """Score each query row by its neighbourhood in `reference` (module docstring has the formulas).

    query [n, d], reference [m, d] or None (score the batch against itself, own row excluded): numpy
    arrays or torch tensors, any float dtype, on any device (computation runs there).
    k: neighbourhood size. methods: subset of METHODS. convention: "textbook" or "faithful".
    chunk_size: query rows per distance block (default keeps a block near 32 MiB).
    self_offset: query row i is reference row self_offset + i (or each offset + i for a sequence) and
    is excluded from its neighbourhood; only with `reference`.
    est_type: LID estimator inside DAO, "mle" or "mom" (the "lid"/"lid_mom" methods are fixed).
    Returns {method: float64 array [n]}, higher = more suspicious.
    """
    methods = _check_choices(methods, convention, est_type)
    q = as_features(query, "query")
    r = q if reference is None else as_features(reference, "reference").to(q.device)
    if r.shape[1] != q.shape[1]:
        raise ValueError(f"query has d={q.shape[1]} features but reference has d={r.shape[1]}")
    excl = exclusions(q.shape[0], r.shape[0], reference is None, self_offset, q.device)
    if convention == "faithful" and excl is None:
        raise ValueError(
            "convention='faithful' reproduces the published in-batch arithmetic: use reference=None, "
            "or give self_offset to say where the queries sit inside the reference"
        )
    _check_k(k, q.shape[0], r.shape[0], excl, methods, convention, reference is None)
    if q.shape[0] == 0:
        return {m: np.zeros(0) for m in methods}
    space = Space.build(r, q)
    qv = space.reference_view() if reference is None else space.query_view(q)
    faithful = convention == "faithful"
    q_dist, q_idx = search(space, qv, k + faithful, excl, chunk_size)
    scores, kdist = _query_scores(q_dist, k, methods, faithful, space.floor)
    if {"slof", "dao"} & set(methods):
        nbr = _faithful_index(q_idx[:, :k], excl) if faithful else q_idx[:, :k]
        rk_o, lid_o = _neighbour_stats(space, nbr, q_dist, excl, k, faithful, est_type, chunk_size)
        log_ratio = torch.log(kdist[:, None] / rk_o)  # [n, k]
        if "slof" in methods:
            scores["slof"] = (kdist[:, None] / rk_o).mean(1)
        if "dao" in methods:
            scores["dao"] = _dao(lid_o * log_ratio, faithful)
    if faithful:
        scores = {m: torch.nan_to_num(s, **FAITHFUL_FILL) for m, s in scores.items()}
    return {m: scores[m].detach().to("cpu", torch.float64).numpy() for m in methods}


# ----------------------------------------------------------------------------- the formulas


def distance_floor(reference) -> float:
    """The textbook distance clamp of a reference set [m, d]: DIST_FLOOR_REL x its RMS spread."""
    r = torch.as_tensor(reference).detach().to(torch.float64)
    rms = math.sqrt(float(((r - r.mean(0)) ** 2).sum(1).mean())) if r.shape[0] else 0.0
    return DIST_FLOOR_REL * rms if rms > 0 else math.sqrt(torch.finfo(torch.float64).tiny)


def reference_stats(dist: torch.Tensor, *, floor: float, est_type: str = "mle"):
    """Textbook (r_k(o), LID(o)) [u] of reference rows from their sorted distances to the k nearest
    other reference rows, dist float64 [u, k] (used by the bank/global reference sets)."""
    return _reference_stats(dist, False, est_type, floor)


def scores_from_neighbours(q_dist: torch.Tensor, rk_o: torch.Tensor, lid_o: torch.Tensor, methods, *,
                           floor: float) -> dict[str, np.ndarray]:
    """Textbook scores from each query's sorted k-NN distances q_dist [n, k] (float64) and its
    neighbours' r_k(o) and LID(o) [n, k] (from `reference_stats`); {method: float64 [n]}.
    The same arithmetic as `knn_scores(convention="textbook")`, for neighbours found elsewhere."""
    methods = _check_choices(methods, "textbook", "mle")
    k = q_dist.shape[1]
    scores, kdist = _query_scores(q_dist, k, methods, False, floor)
    if "slof" in methods:
        scores["slof"] = (kdist[:, None] / rk_o).mean(1)
    if "dao" in methods:
        scores["dao"] = _dao(lid_o * torch.log(kdist[:, None] / rk_o), False)
    return {m: scores[m].detach().to("cpu", torch.float64).numpy() for m in methods}


def _query_scores(q_dist, k, methods, faithful, floor):
    """kdist / lid / lid_mom of each query from its sorted neighbour distances [n, k (+1 faithful)]."""
    if faithful:
        a = q_dist  # [n, k+1]: r_1 .. r_{k+1}
        kdist = a[:, k]
        lids = {"lid": _faithful_lid(a, k, "mle"), "lid_mom": _faithful_lid(a, k, "mom")}
    else:
        a = q_dist.clamp(min=floor)  # [n, k]
        kdist = a[:, k - 1]
        lids = {"lid": _lid(a, "mle"), "lid_mom": _lid(a, "mom")} if k > 1 else {}
    scores = {"kdist": kdist} if "kdist" in methods else {}
    scores.update({m: lids[m] for m in ("lid", "lid_mom") if m in methods})
    return scores, kdist


def _lid(r, est_type):
    """Textbook LID from clamped sorted distances r [n, k] (k >= 2), capped at LID_MAX."""
    rk = r[:, -1:]
    if est_type == "mle":  # -(mean ln(r_i / r_k))^-1; the mean is <= 0
        neg_mean_log = -torch.log(r / rk).mean(1)
        return 1.0 / neg_mean_log.clamp(min=1.0 / LID_MAX)
    m = r.mean(1)
    gap = rk[:, 0] - m
    return torch.where(gap > 0, m / gap.clamp(min=torch.finfo(r.dtype).tiny), LID_MAX).clamp(max=LID_MAX)


def _faithful_lid(a, k, est_type):
    """Published LID from a sorted row a [n, >= k+1]: columns 0..k-1 against column k, +1e-4 inside log."""
    if est_type == "mle":
        return -k / torch.log(a[:, :k] / a[:, k : k + 1] + FAITHFUL_EPS).sum(1)
    m = a[:, :k].mean(1)
    return m / (a[:, k] - m)


def _dao(terms, faithful):
    """DAO from terms LID(o) * ln(r_k(q)/r_k(o)) [n, k]: log-mean (published) or mean of exp (textbook)."""
    if faithful:
        return terms.mean(1)
    log_mean = torch.logsumexp(terms, dim=1) - math.log(terms.shape[1])
    return torch.exp(log_mean).clamp(max=torch.finfo(torch.float64).max)


def _neighbour_stats(space, nbr, q_dist, excl, k, faithful, est_type, chunk_size):
    """(r_k(o), LID(o)) [n, k] for the neighbours `nbr` [n, k], each o computed once, o excluded."""
    m = space.x64.shape[0]
    rk_tab = torch.full((m,), math.nan, dtype=torch.float64, device=nbr.device)
    lid_tab = rk_tab.clone()
    own = _own_rows(excl)  # query rows whose exclusion is exactly their own reference row
    if own is not None:  # their first k self-excluded distances are already known
        rk_tab[own], lid_tab[own] = _reference_stats(q_dist[:, :k], faithful, est_type, space.floor)
    needed = torch.unique(nbr)
    missing = needed[torch.isnan(rk_tab[needed])]
    if missing.numel():
        dist, _ = search(space, space.reference_view(missing), k, missing[:, None], chunk_size)
        rk_tab[missing], lid_tab[missing] = _reference_stats(dist, faithful, est_type, space.floor)
    return rk_tab[nbr], lid_tab[nbr]


def _reference_stats(dist, faithful, est_type, floor):
    """(r_k(o), LID(o)) from o's self-excluded sorted distances dist [u, k]."""
    if faithful:  # published: the sorted full row keeps the zero self-distance in column 0
        a_full = torch.cat([torch.zeros_like(dist[:, :1]), dist], dim=1)  # [u, k+1]
        return dist[:, -1], _faithful_lid(a_full, dist.shape[1], est_type)
    r = dist.clamp(min=floor)
    lid = _lid(r, est_type) if r.shape[1] > 1 else torch.full_like(r[:, 0], math.nan)
    return r[:, -1], lid


def _faithful_index(idx, excl):
    """Published bug: a position in the masked row is used as a sample index. idx [n, k] -> [n, k]."""
    return idx - (excl[:, None, :] < idx[:, :, None]).sum(-1)


def _own_rows(excl):
    """Reference row of each query when every query excludes exactly one row (its own), else None."""
    return excl[:, 0] if excl is not None and excl.shape[1] == 1 else None


# ----------------------------------------------------------------------------- validation


def _check_choices(methods, convention, est_type):
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods={list(methods)}: choose one or more of {list(METHODS)}")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r}: choose one of {list(CONVENTIONS)}")
    if est_type not in EST_TYPES:
        raise ValueError(f"est_type={est_type!r}: choose one of {list(EST_TYPES)}")
    return tuple(dict.fromkeys(methods))


def _check_k(k, n, m, excl, methods, convention, in_batch):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k={k!r}: k must be an integer >= 1")
    faithful = convention == "faithful"
    available = m - (0 if excl is None else excl.shape[1])
    if k + faithful > available:  # the published code reads the (k+1)-th neighbour of every query
        if in_batch and not faithful:
            rule = f"k={k} must be < batch size {n} (self excluded)"
        elif in_batch:
            rule = (f"k={k} must be < batch size - 1 = {n - 1} in convention='faithful' (self "
                    "excluded; the published code reads the (k+1)-th neighbour)")
        else:
            rule = (f"k={k} needs {k + faithful} of the {available} reference rows available per "
                    f"query{' in convention=faithful' if faithful else ''}")
        raise ValueError(rule + "; lower k or score a larger batch")
    if {"slof", "dao"} & set(methods) and k > m - 1:
        raise ValueError(f"k={k} must be < reference size {m}: slof/dao need each neighbour's own "
                         "k neighbours (itself excluded); lower k")
    if not faithful and k == 1 and {"lid", "lid_mom", "dao"} & set(methods):
        raise ValueError("k=1: LID (and DAO, which uses it) is undefined for k=1 because its k-th "
                         "term is always ln(1)=0; use k >= 2")
