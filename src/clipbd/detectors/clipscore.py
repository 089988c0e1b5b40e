"""CLIPScore (Hessel et al. 2021) as a sample detector: how badly an image and its own caption agree
under the trained model. Score = -cos(image embedding, caption embedding), higher = more suspicious
(a mismatched or noisy pair). Hessel et al.'s 2.5 * max(cos, 0) is a monotone rescaling up to the
clamp, so the ranking is the same except that it ties all negative cosines.

Direction on backdoors: a model that learned the backdoor maps a triggered image close to the target
caption, so a poisoned pair can be *more* aligned than a clean one and score low here; CLIPScore finds
misaligned (noisy) pairs, and is reported as the paper's baseline, not as a backdoor detector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np


def clip_scores(image_emb, text_emb) -> np.ndarray:
    """image_emb [n, e], text_emb [n, e] (raw model outputs) -> float64 [n] = -cosine of each pair."""
    a, b = np.asarray(image_emb, dtype=np.float64), np.asarray(text_emb, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"clipscore: image {a.shape} and caption {b.shape} embeddings must be [n, e] alike")
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    if (na == 0).any() or (nb == 0).any() or not (np.isfinite(na).all() and np.isfinite(nb).all()):
        raise ValueError("clipscore: zero or non-finite embeddings have no cosine; check the model")
    return -(a * b).sum(1) / (na * nb)


@dataclass(frozen=True)
class CLIPScore:
    """Config face (conf/detector/clipscore.yaml): needs only the extracted image and caption embeddings."""

    needs: ClassVar[str] = "pairs"
    higher_is_suspicious: ClassVar[bool] = True  # clipbd.detectors.ranking

    def score_pairs(self, image_emb, text_emb) -> np.ndarray:
        return clip_scores(image_emb, text_emb)
