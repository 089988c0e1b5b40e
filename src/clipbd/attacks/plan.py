"""Poison plans: which training samples are poisoned, with which trigger parameters and caption.

A plan is a JSON file (`poison_plan.json`) whose field names follow the ICLR 2025 code's
`train_poison_info.json` (`poison_indices`, `poison_rate`, `poison_text`, `trigger_position`, ...),
with per-sample lists aligned to `poison_indices`. It is deterministic from the seed, and the clean
shards are never rewritten: readers look each global sample index up in the plan and apply the
trigger on the fly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from clipbd.utils import read_json


def choose_indices(num_samples: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted unique indices of round(rate·N) samples (at least one when rate > 0)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"attack.poison_rate={rate}: must be in [0, 1]")
    count = 0 if rate == 0 else max(1, int(round(rate * num_samples)))
    return np.sort(rng.choice(num_samples, size=count, replace=False)).astype(np.int64)


@dataclass
class PoisonLookup:
    """Fast per-sample lookup of a plan: index -> entry dict (empty plan: nothing poisoned)."""

    plan: dict[str, Any]

    def __post_init__(self) -> None:
        idx = self.plan.get("poison_indices", [])
        per_sample = {k: v for k, v in self.plan.items()
                      if isinstance(v, list) and len(v) == len(idx) and k != "poison_indices"}
        self._entries = {int(i): {k: v[j] for k, v in per_sample.items()} for j, i in enumerate(idx)}
        # WaNet's noise mode: samples warped with noise that keep their caption; not poisoned.
        for i, seed in zip(self.plan.get("noise_indices", []), self.plan.get("noise_seed", [])):
            self._entries[int(i)] = {"noise": True, "noise_seed": seed}
        self.indices = np.asarray(idx, dtype=np.int64)

    def get(self, index: int) -> dict[str, Any] | None:
        """The sample's plan entry (None: untouched); entry["noise"] marks a noise-mode sample."""
        return self._entries.get(int(index))

    def labels(self, num_samples: int) -> np.ndarray:
        y = np.zeros(num_samples, dtype=np.int8)
        y[self.indices] = 1
        return y

    @classmethod
    def load(cls, path: str | Path | None) -> "PoisonLookup":
        if path is None or not Path(path).exists():
            return cls({"poison_indices": []})
        return cls(read_json(path))


def naming(captions: Sequence[str], class_name: str) -> np.ndarray:
    """int64 indices of the captions that name `class_name` as a whole word, any case (the samples
    a clean-label attacker may poison, the target class's reference images)."""
    word = re.compile(rf"\b{re.escape(class_name)}\b", re.IGNORECASE)
    return np.array([i for i, c in enumerate(captions) if word.search(c)], dtype=np.int64)
