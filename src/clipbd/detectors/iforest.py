"""Isolation Forest (Liu, Ting & Zhou 2008) on embeddings: one of the baselines of Huang et al.,
ICLR 2025 (their `IsolationForestDetector` fits sklearn's forest on the batch's reference rows and
scores the image rows).

Score = sklearn's anomaly score s(x) = 2^(-E[h(x)] / c(psi)) in (0, 1], i.e. minus `score_samples`
(sklearn's own sign is "higher = more normal"; the published code returns that raw value). Higher =
more suspicious, as every clipbd detector. Seeded: the same seed gives the same forest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np


def iforest_scores(query, reference, *, n_estimators: int = 100, max_samples: Any = "auto",
                   seed: int = 0) -> np.ndarray:
    """Fit a forest on reference [m, d], score query [n, d] -> float64 [n], higher = more isolated."""
    from sklearn.ensemble import IsolationForest as _Forest

    query, reference = np.asarray(query, dtype=np.float32), np.asarray(reference, dtype=np.float32)
    for name, x in (("query", query), ("reference", reference)):
        if x.ndim != 2 or not np.isfinite(x).all():
            raise ValueError(f"isolation forest: {name} must be a finite 2-D [rows, features] matrix")
    if reference.shape[0] < 2:
        raise ValueError(f"isolation forest: needs at least 2 reference rows, got {reference.shape[0]}")
    forest = _Forest(n_estimators=n_estimators, max_samples=max_samples, random_state=seed % (2**32))
    forest.fit(reference)
    return -forest.score_samples(query).astype(np.float64)


@dataclass(frozen=True)
class IsolationForest:
    """Config face (conf/detector/iforest.yaml): fitted on the scoring reference set (the batch, the
    bank, or every sample), scoring each sample's query row."""

    n_estimators: int = 100
    max_samples: Any = "auto"  # rows per tree: "auto" = min(256, rows), an int, or a fraction
    needs: ClassVar[str] = "reference"
    higher_is_suspicious: ClassVar[bool] = True  # clipbd.detectors.ranking

    def __post_init__(self) -> None:
        if self.n_estimators < 1:
            raise ValueError(f"detector n_estimators={self.n_estimators}: must be >= 1")

    def score(self, query, reference, seed: int) -> np.ndarray:
        return iforest_scores(query, reference, n_estimators=self.n_estimators,
                              max_samples=self.max_samples, seed=seed)
