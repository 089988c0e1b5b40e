"""TextSpan naming of a head (Gandelsman et al., ICLR 2024, §4.1; `compute_complete_text_set.py`).

A head's terms over a set of images span a low-rank subspace; project a pool of text embeddings onto
the span of its top `rank` right singular directions, then greedily pick the text along which the
(centred) head terms vary most, remove that direction from the terms and the texts, and repeat.
The picked texts and the share of the head's variance each explains name what the head encodes.
"""

from __future__ import annotations

import torch


def textspan(terms: torch.Tensor, text_emb: torch.Tensor, texts: list[str], *, iters: int = 5,
             rank: int = 80) -> list[dict]:
    """terms [N, D] (one head over N images), text_emb [M, D] (the pool), texts [M] ->
    `iters` dicts {"text", "variance"}: the picked text and the share of the head's total variance
    removed by its direction (float64 throughout; the published code runs the same steps)."""
    x = terms.double()
    t = text_emb.double()
    vh = torch.linalg.svd(x, full_matrices=False).Vh[: min(rank, x.shape[1])]  # [r, D] orthonormal rows
    t = (t @ vh.T) @ vh                                                       # texts in the head's span
    x = x - x.mean(0, keepdim=True)
    total = x.pow(2).sum().clamp_min(1e-300)
    out = []
    for _ in range(min(iters, len(texts))):
        best = int((x @ t.T).std(0).argmax())
        d = t[best] / t[best].norm().clamp_min(1e-300)
        removed = (x @ d).pow(2).sum()
        out.append({"text": texts[best], "variance": float(removed / total)})
        x = x - (x @ d)[:, None] * d
        t = t - (t @ d)[:, None] * d
    return out
