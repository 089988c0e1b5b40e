"""Test-only re-implementation of the published detectors' arithmetic (Huang et al., ICLR 2025 code,
`backdoor_sample_detector/{k_distance,lid_detection,slof,dao}.py`), kept deliberately literal:
full sorts of the masked distance matrix, the per-row Python gather loop, `+ 1e-4` inside the logs,
masked-row positions used as sample indices. It is the oracle for `knn_scores(convention="faithful")`
and the slow baseline in benchmarks/bench_knn.py.

Each detector takes the features the published `forward` computes (image features, optionally text
features, optionally gathered references and this rank's row offset) instead of a model.
Deviation: `torch.sort(..., stable=True)` so that exact ties are ordered by index (the published
default sort is unstable; this only matters for duplicate points).
"""

from __future__ import annotations

import torch

EXACT = "donot_use_mm_for_euclid_dist"  # direct differences: exact self-distance 0
PUBLISHED_DEFAULT = "use_mm_for_euclid_dist_if_necessary"  # what the published code runs by default


def pair_wise_distance(data, reference, offset=0, compute_mode=EXACT):
    """cdist(data, reference) with entry (i, offset + i) removed -> [b, m - 1]."""
    b = data.shape[0]
    r = torch.cdist(data, reference, p=2, compute_mode=compute_mode)
    mask = torch.zeros((b, reference.shape[0]), device=data.device, dtype=torch.bool)
    mask = torch.diagonal_scatter(mask, torch.ones(b, dtype=torch.bool), offset)
    return r[~mask].view(b, -1)


def _distances(images, texts, reference, text_reference, offset, compute_mode, modality):
    """(masked query distances [b, M - e], full reference [M, d]) as the published forward builds them."""
    vref = images if reference is None else reference
    if texts is None:
        return pair_wise_distance(images, vref, offset, compute_mode), vref
    tref = texts if text_reference is None else text_reference
    query = images if modality == "vision" else texts
    d_v = pair_wise_distance(query, vref, offset, compute_mode)
    d_t = pair_wise_distance(query, tref, offset, compute_mode)
    return torch.cat([d_v, d_t], dim=1), torch.cat([vref, tref], dim=0)


def _lids(a, k, est_type):
    if est_type == "mle":
        return -k / torch.sum(torch.log(a[:, :k] / a[:, k].unsqueeze(-1) + 1.0e-4), dim=1)
    m = torch.mean(a[:, :k], dim=1)
    return m / (a[:, k] - m)


def _full_sorted(full_reference, compute_mode):
    full_d = torch.cdist(full_reference, full_reference, compute_mode=compute_mode)
    a_full_d, _ = torch.sort(full_d, dim=1, stable=True)
    return a_full_d


def kdistance(images, k, texts=None, reference=None, text_reference=None, offset=0,
              compute_mode=EXACT, modality="vision"):
    d, _ = _distances(images, texts, reference, text_reference, offset, compute_mode, modality)
    a, _ = torch.sort(d, dim=1, stable=True)
    return a[:, k]


def lid(images, k, est_type="mle", texts=None, reference=None, text_reference=None, offset=0,
        compute_mode=EXACT, modality="vision"):
    d, _ = _distances(images, texts, reference, text_reference, offset, compute_mode, modality)
    a, _ = torch.sort(d, dim=1, stable=True)
    return _lids(a, k, est_type)


def slof(images, k, texts=None, reference=None, text_reference=None, offset=0,
         compute_mode=EXACT, modality="vision"):
    d, full_ref = _distances(images, texts, reference, text_reference, offset, compute_mode, modality)
    a, idx = torch.sort(d, dim=1, stable=True)
    a_full_d = _full_sorted(full_ref, compute_mode)
    idx_k = idx[:, :k]
    d_k = [torch.index_select(a_full_d, dim=0, index=row) for row in idx_k]
    d_k = torch.stack(d_k)[:, :, k]
    scores = a[:, k].unsqueeze(-1) / d_k
    scores = scores.mean(dim=1)
    return torch.nan_to_num(scores, nan=1000.0, posinf=1000.0, neginf=0.0)


def dao(images, k, est_type="mle", texts=None, reference=None, text_reference=None, offset=0,
        compute_mode=EXACT, modality="vision"):
    d, full_ref = _distances(images, texts, reference, text_reference, offset, compute_mode, modality)
    a, idx = torch.sort(d, dim=1, stable=True)
    a_full_d = _full_sorted(full_ref, compute_mode)
    full_rank_lids = _lids(a_full_d, k, est_type)
    idx_k = idx[:, :k]
    d_k = [torch.index_select(a_full_d, dim=0, index=row) for row in idx_k]
    d_k = torch.stack(d_k)[:, :, k]
    lid_k = [torch.index_select(full_rank_lids, dim=0, index=row) for row in idx_k]
    lid_k = torch.stack(lid_k)
    scores = lid_k * torch.log(a[:, k].unsqueeze(-1) / d_k)
    scores = scores.mean(dim=1)
    return torch.nan_to_num(scores, nan=1000.0, posinf=1000.0, neginf=0.0)


DETECTORS = {"kdist": kdistance, "lid": lid, "slof": slof, "dao": dao}
