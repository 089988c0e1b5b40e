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

Speed: squared distances come from one float32 matrix product per query chunk, on the tensors' device
(features are centred and scaled by a power of two first); in-batch (the batch is its own reference)
the product is symmetric, so up to ``_SYM_BYTES`` only its upper block triangle is multiplied and the
rest is copied transposed (44% fewer flops at 4096 rows). ``torch.topk`` picks k + ``_EXTRA``
candidates, whose distances are recomputed exactly in float64 from the original features and re-sorted.
A rigorous rounding-error bound then certifies per row that no non-candidate can be closer than the k-th
exact neighbour; rows that fail (near-ties at float32 resolution) are retried with 4x more candidates up
to the full row, so the result equals exact float64 brute force. Neighbour statistics are computed once
per needed reference row and gathered with tensor indexing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

METHODS = ("kdist", "lid", "lid_mom", "slof", "dao")
CONVENTIONS = ("textbook", "faithful")
EST_TYPES = ("mle", "mom")
LID_MAX = 1e6  # cap for LID when all k neighbour distances are equal (estimator diverges)
DIST_FLOOR_REL = 1e-12  # textbook distances are clamped at this times the reference's RMS spread
FAITHFUL_EPS = 1e-4  # the published code adds this inside every log
FAITHFUL_FILL = {"nan": 1000.0, "posinf": 1000.0, "neginf": 0.0}  # published nan_to_num
_EXTRA = 8  # float32 candidates beyond the k needed; more = fewer fallback rows, more re-ranking work
_CHUNK_ELEMS = 1 << 23  # query rows per chunk x reference rows (32 MiB of float32 distances)
_GATHER_ELEMS = 1 << 19  # rows x candidates x dim per exact re-ranking step (4 MiB of float64)
_SYM_BYTES = 1 << 28  # in-batch: the whole [m, m] product up to this size (256 MiB), half computed
_SYM_BLOCK = 512  # rows per block of the symmetric product (512 beat 1024 and 2048 at 4096 x 1024 here)


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
    q = _as_features(query, "query")
    r = q if reference is None else _as_features(reference, "reference").to(q.device)
    if r.shape[1] != q.shape[1]:
        raise ValueError(f"query has d={q.shape[1]} features but reference has d={r.shape[1]}")
    excl = _exclusions(q.shape[0], r.shape[0], reference is None, self_offset, q.device)
    if convention == "faithful" and excl is None:
        raise ValueError(
            "convention='faithful' reproduces the published in-batch arithmetic: use reference=None, "
            "or give self_offset to say where the queries sit inside the reference"
        )
    _check_k(k, q.shape[0], r.shape[0], excl, methods, convention, reference is None)
    if q.shape[0] == 0:
        return {m: np.zeros(0) for m in methods}
    space = _Space.build(r, q)
    qv = space.reference_view() if reference is None else space.query_view(q)
    faithful = convention == "faithful"
    q_dist, q_idx = _knn(space, qv, k + faithful, excl, chunk_size)
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


def exact_knn(query, reference=None, k: int = 16, *, chunk_size: int | None = None):
    """Exact Euclidean k nearest neighbours, ties broken by index, own row excluded if reference=None.

    query [n, d], reference [m, d] (numpy or torch). Returns (dist float64 [n, k] ascending,
    idx int64 [n, k]) as torch tensors on the query's device.
    """
    q = _as_features(query, "query")
    r = q if reference is None else _as_features(reference, "reference").to(q.device)
    excl = _exclusions(q.shape[0], r.shape[0], reference is None, None, q.device)
    available = r.shape[0] - (0 if excl is None else 1)
    if not 1 <= k <= available:
        raise ValueError(f"k={k} must be >= 1 and <= {available} available reference rows")
    space = _Space.build(r, q)
    qv = space.reference_view() if reference is None else space.query_view(q)
    return _knn(space, qv, k, excl, chunk_size)


# ----------------------------------------------------------------------------- scores from distances


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
        dist, _ = _knn(space, space.reference_view(missing), k, missing[:, None], chunk_size)
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


# ----------------------------------------------------------------------------- exact kNN


@dataclass
class _Space:
    """The reference prepared once, in units of `scale` (a power of two, so rescaling is exact):
    originals for exact re-ranking and a centred copy for the fast candidate-selecting product."""

    x64: torch.Tensor  # [m, d] float64, reference / scale
    mu: torch.Tensor  # [d] float64, mean of x64
    scale: float  # power of two >= the largest |reference - mean| entry (and the queries')
    fast: torch.Tensor  # [m, d] selection dtype (float32 unless its matmul is too coarse), x64 - mu
    norm: torch.Tensor  # [m] float64 squared norms of x64 - mu
    col: torch.Tensor  # [m] selection dtype, norm * (1 - err): folds the column error into the product
    err: float  # relative rounding bound of one approximate squared distance
    abs_err: float  # absolute bound for underflow in the selection dtype
    floor: float  # textbook distance clamp, in original units

    @staticmethod
    def build(r: torch.Tensor, q: torch.Tensor) -> _Space:
        r64 = r.to(torch.float64)
        mu = r64.mean(0)
        centred = r64 - mu
        spread = _max_abs(centred)
        if q is not r:
            spread = max(spread, _max_abs(q.to(torch.float64) - mu))
        if not math.isfinite(spread) or spread > 1e150:
            raise ValueError(f"features spread over {spread:.3g} around their mean; values beyond "
                             "1e150 are not supported, rescale the features")
        scale = 2.0 ** math.ceil(math.log2(spread)) if spread > 0 else 1.0
        x64 = r64 / scale if scale != 1.0 else r64
        centred /= scale  # [m, d], entries in [-1, 1]
        norm = torch.linalg.vecdot(centred, centred)
        dtype, err = _selection_dtype(r.shape[1], r.device)
        abs_err = 4 * (r.shape[1] + 2) * torch.finfo(dtype).tiny
        rms = scale * math.sqrt(float(norm.mean())) if norm.numel() else 0.0
        floor = DIST_FLOOR_REL * rms if rms > 0 else math.sqrt(torch.finfo(torch.float64).tiny)
        col = (norm * (1 - err)).to(dtype)
        return _Space(x64, mu / scale, scale, centred.to(dtype), norm, col, err, abs_err, floor)

    def query_view(self, q: torch.Tensor) -> _View:
        x64 = q.to(torch.float64) / self.scale
        centred = x64 - self.mu
        return _View(x64, centred.to(self.fast.dtype), torch.linalg.vecdot(centred, centred))

    def reference_view(self, rows: torch.Tensor | None = None) -> _View:
        if rows is None:
            return _View(self.x64, self.fast, self.norm)
        return _View(self.x64[rows], self.fast[rows], self.norm[rows])


@dataclass
class _View:
    """Query rows in the units of a _Space."""

    x64: torch.Tensor  # [n, d] float64, query / scale
    fast: torch.Tensor  # [n, d] selection dtype, centred
    norm: torch.Tensor  # [n] float64 squared norms of the centred rows


def _max_abs(x: torch.Tensor) -> float:
    if not x.numel():
        return 0.0
    lo, hi = torch.aminmax(x)
    return max(-float(lo), float(hi))


def _selection_dtype(d: int, device: torch.device) -> tuple[torch.dtype, float]:
    """Dtype of the candidate-selection product and a safe relative error bound for it.

    Higham's bound for a length-d dot product is d*u*|x||y| <= d*u*(|x|^2+|y|^2)/2; the factor 2
    covers the -2 x.y term, the casts and the additions. TF32/bf16 matmuls (allowed by
    torch.set_float32_matmul_precision or cuda.matmul.allow_tf32) have a larger u.
    """
    u32 = 2.0**-24
    u_mm = {"highest": u32, "high": 2.0**-11, "medium": 2.0**-8}[torch.get_float32_matmul_precision()]
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        u_mm = max(u_mm, 2.0**-11)
    err = 2 * ((d + 8) * u_mm + 8 * u32)
    if err < 1e-3:
        return torch.float32, err
    return torch.float64, 2 * (d + 16) * 2.0**-53


def _knn(space: _Space, qv: _View, k: int, excl, chunk_size):
    """k exact nearest reference rows of each query row, skipping excl [n, e] columns.

    Returns (dist float64 [n, k] ascending, idx int64 [n, k]); ties broken by reference index.
    """
    n, m = qv.x64.shape[0], space.x64.shape[0]
    chunk = chunk_size or max(1, _CHUNK_ELEMS // max(m, 1))
    if chunk < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    dist = torch.empty(n, k, dtype=torch.float64, device=qv.x64.device)
    idx = torch.empty(n, k, dtype=torch.int64, device=qv.x64.device)
    symmetric = qv.fast is space.fast and m * m * space.fast.element_size() <= _SYM_BYTES
    whole = _symmetric_product(space) if symmetric else None
    for s in range(0, n, chunk):
        rows = torch.arange(s, min(s + chunk, n), device=dist.device)
        # approx[i, j] = |r_j|^2 (1 - err) - 2 q_i . r_j  (the row constant |q_i|^2 does not rank)
        if whole is not None:
            approx = whole[s : s + rows.numel()]
        else:
            approx = torch.addmm(space.col[None, :], qv.fast[rows], space.fast.T, beta=1, alpha=-2)
        if excl is not None:
            approx.scatter_(1, excl[rows], math.inf)
        todo, n_cand = torch.arange(rows.numel(), device=dist.device), min(k + _EXTRA, m)
        while todo.numel():
            sub = approx if todo.numel() == rows.numel() else approx[todo]
            d, i, ok = _select(space, qv, sub, rows[todo], n_cand, k, excl)
            dist[rows[todo[ok]]], idx[rows[todo[ok]]] = d[ok], i[ok]
            todo, n_cand = todo[~ok], min(m, 4 * n_cand)
    return dist, idx


def _symmetric_product(space: _Space) -> torch.Tensor:
    """col[None, :] - 2 F F^T for F = space.fast [m, d], multiplying only blocks on or above the diagonal.

    Each entry is one float32 dot product (in some summation order), times -2 (exact), plus col: the
    same rounding bound `err` as the chunked addmm. Blocks below the diagonal are the transposes."""
    f = space.fast
    m = f.shape[0]
    out = torch.empty(m, m, dtype=f.dtype, device=f.device)
    for i in range(0, m, _SYM_BLOCK):
        b = min(_SYM_BLOCK, m - i)
        g = torch.mm(f[i : i + b], f[i:].T)  # [b, m - i]: this block row from the diagonal on
        out[i : i + b, i:] = g
        out[i + b :, i : i + b] = g[:, b:].T
    return out.mul_(-2).add_(space.col[None, :])


def _select(space, qv, approx, rows, n_cand, k, excl):
    """Exact top-k among the n_cand best approximate candidates, and whether that is certified exact."""
    vals, cand = torch.topk(approx, n_cand, dim=1, largest=False, sorted=False)  # [c, n_cand]
    d2 = _exact_d2(space.x64, qv.x64[rows], cand)
    if excl is not None:  # excluded columns are candidates only when every other row already is
        d2[(cand[:, :, None] == excl[rows][:, None, :]).any(-1)] = math.inf
    cand, order = torch.sort(cand, dim=1)  # ties by index: sort by index, then stable by distance
    d2, order2 = torch.sort(d2.gather(1, order), dim=1, stable=True)
    cand = cand.gather(1, order2)
    if n_cand == approx.shape[1]:
        ok = torch.ones(cand.shape[0], dtype=torch.bool, device=cand.device)
    else:
        # any non-candidate y has approx(y) >= max(vals), and its true squared distance is
        # >= |q|^2 (1 - err) + approx(y) - abs_err; exact iff that beats the k-th exact distance
        lower = qv.norm[rows] * (1 - space.err) + vals.amax(1).to(torch.float64) - space.abs_err
        ok = lower > d2[:, k - 1]
    return d2[:, :k].sqrt() * space.scale, cand[:, :k], ok


def _exact_d2(r64, q64, cand):
    """Squared distances from q64 [c, d] to r64[cand] [c, n_cand, d], by direct differences in float64."""
    c, n_cand = cand.shape
    out = torch.empty(cand.shape, dtype=torch.float64, device=cand.device)
    step = max(1, _GATHER_ELEMS // max(1, n_cand * r64.shape[1]))  # small steps stay in cache
    for s in range(0, c, step):
        rows = cand[s : s + step]
        diff = r64.index_select(0, rows.reshape(-1)).view(rows.shape[0], n_cand, -1)
        diff -= q64[s : s + step, None, :]
        out[s : s + step] = diff.square_().sum(-1)
    return out


# ----------------------------------------------------------------------------- validation


def _as_features(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        x = x.copy()  # torch warns on read-only numpy memory
    t = torch.as_tensor(x).detach()
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [rows, features] matrix, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must hold floats, got {t.dtype}; cast it, e.g. x.astype('float32')")
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    if not torch.isfinite(t).all():
        rows = (~torch.isfinite(t).all(1)).nonzero()[:, 0].tolist()
        raise ValueError(
            f"{name} has NaN/inf features in {len(rows)} row(s), e.g. rows {rows[:5]}; "
            "drop or repair those samples before scoring"
        )
    return t


def _exclusions(n: int, m: int, in_batch: bool, self_offset, device):
    """Reference columns each query row must skip, [n, e] int64, or None."""
    if in_batch:
        if self_offset is not None:
            raise ValueError("self_offset only applies with a separate reference; reference=None "
                             "already excludes each row's own entry")
        offsets = [0]
    elif self_offset is None:
        return None
    else:
        offsets = [self_offset] if isinstance(self_offset, (int, np.integer)) else list(self_offset)
    for off in offsets:
        if not 0 <= int(off) <= m - n:
            raise ValueError(f"self_offset={off}: query rows {off}..{int(off) + n - 1} must lie inside "
                             f"the reference's {m} rows")
    if len(set(int(o) for o in offsets)) != len(offsets) or any(
        abs(int(a) - int(b)) < n for a in offsets for b in offsets if a != b
    ):
        raise ValueError(f"self_offset={list(offsets)}: the excluded blocks of {n} rows overlap")
    return torch.stack([torch.arange(n, device=device) + int(o) for o in offsets], dim=1)


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
