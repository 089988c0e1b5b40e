"""Filter-and-retrain (Huang et al., ICLR 2025, "safe mode"): drop the training samples a detector
ranks most suspicious and train again on the rest. The paper's `safe_percentage` is the fraction
*kept*; clipbd's `filter.drop_fraction` is the fraction dropped (kept = 1 - drop_fraction).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

EXCLUDED_FILE = "filter/excluded.json"


def top_fraction(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Global indices (positions in `scores` [N]) of the round(fraction·N) highest scores, ties
    broken by index (the order of ranked.csv), sorted ascending."""
    n_drop = int(round(fraction * len(scores)))
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return np.sort(order[:n_drop]).astype(np.int64)


def read_detector_scores(scores_h5: Path, detector: str) -> np.ndarray:
    """One detector's scores from a run's scores.h5 (position = global sample index)."""
    with h5py.File(scores_h5, "r") as f:
        if detector not in f:
            have = [k for k in f.keys() if k not in ("index", "key", "is_poison")]
            raise KeyError(detector, have)
        return f[detector][()]


def write_excluded(path: Path, indices: np.ndarray, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta | {"num_excluded": int(len(indices)), "excluded": indices.tolist()}))
    tmp.replace(path)


def read_excluded(path: Path) -> np.ndarray:
    return np.asarray(json.loads(Path(path).read_text())["excluded"], dtype=np.int64)
