"""Config face of the neighbourhood detectors (conf/detector/{dao,slof,kdist,lid}.yaml).

A `Neighbourhood` names one method of `clipbd.detectors.knn.knn_scores`; the extract stage groups
detectors that share (k, convention) so one distance computation serves all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from clipbd.detectors.knn import METHODS


@dataclass(frozen=True)
class Neighbourhood:
    method: str
    k: int = 16
    convention: str = "textbook"  # textbook | faithful (the published code's arithmetic)
    needs: ClassVar[str] = "neighbourhood"  # scored against scoring.reference (clipbd.scoring)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"detector method={self.method!r}: must be one of {', '.join(METHODS)}")
        if self.k < 1:
            raise ValueError(f"detector k={self.k}: k must be ≥ 1")
        if self.convention not in ("textbook", "faithful"):
            raise ValueError(f"detector convention={self.convention!r}: must be textbook or faithful")

    @property
    def higher_is_suspicious(self) -> bool:
        """k-distance, SLOF and DAO are outlier scores: higher is more suspicious. LID estimates a
        dimension, and which way a poison moves it depends on the regime: in-batch at a 5% poison
        rate a poison's neighbours are the other poisons and its LID is *lower* than clean (AUROC
        0.015, experiments/detectors_default/README.md), against every sample it is higher (0.65)."""
        return self.method not in ("lid", "lid_mom")

    @property
    def group(self) -> tuple[int, str]:
        return (self.k, self.convention)
