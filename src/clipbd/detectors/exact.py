"""Exact Euclidean k-nearest-neighbour search, float32 speed with float64 results: the engine under
the neighbourhood detectors (clipbd.detectors.knn, in-batch and bank scoring) and the re-ranking of
the global reference set's faiss candidates (clipbd.detectors.reference).

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
from dataclasses import dataclass

import numpy as np
import torch

_EXTRA = 8  # float32 candidates beyond the k needed; more = fewer fallback rows, more re-ranking work
_CHUNK_ELEMS = 1 << 23  # query rows per chunk x reference rows (32 MiB of float32 distances)
_GATHER_ELEMS = 1 << 19  # rows x candidates x dim per exact re-ranking step (4 MiB of float64)
_SYM_BYTES = 1 << 28  # in-batch: the whole [m, m] product up to this size (256 MiB), half computed
_SYM_BLOCK = 512  # rows per block of the symmetric product (512 beat 1024 and 2048 at 4096 x 1024 here)
DIST_FLOOR_REL = 1e-12  # textbook distances are clamped at this times the reference's RMS spread


def exact_knn(query, reference=None, k: int = 16, *, chunk_size: int | None = None):
    """Exact Euclidean k nearest neighbours, ties broken by index, own row excluded if reference=None.

    query [n, d], reference [m, d] (numpy or torch). Returns (dist float64 [n, k] ascending,
    idx int64 [n, k]) as torch tensors on the query's device.
    """
    q = as_features(query, "query")
    r = q if reference is None else as_features(reference, "reference").to(q.device)
    excl = exclusions(q.shape[0], r.shape[0], reference is None, None, q.device)
    available = r.shape[0] - (0 if excl is None else 1)
    if not 1 <= k <= available:
        raise ValueError(f"k={k} must be >= 1 and <= {available} available reference rows")
    space = Space.build(r, q)
    qv = space.reference_view() if reference is None else space.query_view(q)
    return search(space, qv, k, excl, chunk_size)


@dataclass
class Space:
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
    def build(r: torch.Tensor, q: torch.Tensor) -> Space:
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
        return Space(x64, mu / scale, scale, centred.to(dtype), norm, col, err, abs_err, floor)

    def query_view(self, q: torch.Tensor) -> View:
        x64 = q.to(torch.float64) / self.scale
        centred = x64 - self.mu
        return View(x64, centred.to(self.fast.dtype), torch.linalg.vecdot(centred, centred))

    def reference_view(self, rows: torch.Tensor | None = None) -> View:
        if rows is None:
            return View(self.x64, self.fast, self.norm)
        return View(self.x64[rows], self.fast[rows], self.norm[rows])


@dataclass
class View:
    """Query rows in the units of a Space."""

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


def search(space: Space, qv: View, k: int, excl, chunk_size):
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


def _symmetric_product(space: Space) -> torch.Tensor:
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
    d2 = exact_d2(space.x64, qv.x64[rows], cand)
    if excl is not None:  # excluded columns are candidates only when every other row already is
        d2[(cand[:, :, None] == excl[rows][:, None, :]).any(-1)] = math.inf
    d2, cand = order_candidates(d2, cand)
    if n_cand == approx.shape[1]:
        ok = torch.ones(cand.shape[0], dtype=torch.bool, device=cand.device)
    else:
        # any non-candidate y has approx(y) >= max(vals), and its true squared distance is
        # >= |q|^2 (1 - err) + approx(y) - abs_err; exact iff that beats the k-th exact distance
        lower = qv.norm[rows] * (1 - space.err) + vals.amax(1).to(torch.float64) - space.abs_err
        ok = lower > d2[:, k - 1]
    return d2[:, :k].sqrt() * space.scale, cand[:, :k], ok


def exact_d2(r, q, cand):
    """Squared distances from q [c, d] to r[cand] [c, n_cand, d], by direct differences in float64
    (r and q of any float dtype, converted exactly; rows gathered in cache-sized steps)."""
    c, n_cand = cand.shape
    out = torch.empty(cand.shape, dtype=torch.float64, device=cand.device)
    step = max(1, _GATHER_ELEMS // max(1, n_cand * r.shape[1]))  # small steps stay in cache
    for s in range(0, c, step):
        rows = cand[s : s + step]
        diff = r.index_select(0, rows.reshape(-1)).view(rows.shape[0], n_cand, -1).to(torch.float64)
        diff -= q[s : s + step, None, :].to(torch.float64)
        out[s : s + step] = diff.square_().sum(-1)
    return out


def order_candidates(d2, cand):
    """Sort each row's candidates by (distance, index): by index, then stably by distance. [c, n]."""
    cand, order = torch.sort(cand, dim=1)
    d2, order2 = torch.sort(d2.gather(1, order), dim=1, stable=True)
    return d2, cand.gather(1, order2)


# ----------------------------------------------------------------------------- inputs


def as_features(x, name: str) -> torch.Tensor:
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


def exclusions(n: int, m: int, in_batch: bool, self_offset, device):
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
