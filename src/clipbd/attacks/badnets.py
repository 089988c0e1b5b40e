"""BadNets (Gu et al., 2017) as used on CLIP by Carlini & Terzis (2022) and Huang et al. (ICLR 2025):
a black/white grid patch pasted at a random position of each poisoned training image, whose caption
is replaced by a caption naming the target class. At test time the patch goes at a fixed position.

The clean-label variant (Turner et al. 2019's threat model on image–text data) poisons only samples
whose caption already names the target class and leaves every caption unchanged: the patch is the
only thing the attacker adds.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

from clipbd.attacks import triggers
from clipbd.attacks.base import Attack
from clipbd.attacks.plan import naming

log = logging.getLogger("clipbd")


class BadNets(Attack):
    name = "badnets"

    def __init__(self, poison_rate: float = 1e-4, target_class: str = "banana",
                 target_captions: Sequence[str] | None = None, patch_size: int = 16, grid: int = 4,
                 train_position: str = "random", test_position: Sequence[float] = (1.0, 1.0)):
        """patch_size: side in pixels at the model's input resolution (paper: 16 at 224 px).
        grid: cells per side of the black/white checkerboard. Positions are fractions (x, y) of the
        free range [0, size − patch]: (1, 1) is the bottom-right corner.
        target_captions: poison captions to draw from; None = the dataset's prompts for target_class."""
        super().__init__(poison_rate, target_class, target_captions)
        triggers.checkerboard(int(patch_size), int(grid))  # validates patch_size/grid
        if train_position not in ("random", "fixed"):
            raise ValueError(f"attack.train_position={train_position}: must be random or fixed")
        self.patch_size = int(patch_size)
        self.grid = int(grid)
        self.train_position = train_position
        self.test_position = tuple(float(v) for v in test_position)

    def header(self) -> dict[str, Any]:
        return {"patch_size": self.patch_size, "patch_location": self.train_position}

    def sample_params(self, idx: np.ndarray, rng: np.random.Generator, ctx: Any) -> dict[str, list]:
        if self.train_position == "random":
            return {"trigger_position": rng.random((len(idx), 2)).round(6).tolist()}
        return {"trigger_position": [list(self.test_position)] * len(idx)}

    # ------------------------------------------------------------------ triggers (pure)
    def pattern(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[patch, patch] checkerboard of 0/1, `grid` cells per side."""
        return triggers.checkerboard(self.patch_size, self.grid).to(device)

    def stamp(self, img: torch.Tensor, position: Sequence[float]) -> torch.Tensor:
        """img [3, H, W] (or [B, 3, H, W]) in [0, 1] -> copy with the patch at fractional `position`."""
        return triggers.paste(img, self.pattern(img.device), position)

    def trigger(self, img: torch.Tensor, entry: dict[str, Any] | None) -> torch.Tensor:
        return self.stamp(img, self.test_position if entry is None else entry["trigger_position"])

    def mask_and_pattern(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The test-time trigger as DECREE's (mask [1, H, W], pattern [3, H, W])."""
        mask = triggers.paste(torch.zeros(1, h, w), torch.ones(1, self.patch_size, self.patch_size),
                              self.test_position)
        return mask, self.stamp(torch.zeros(3, h, w), self.test_position) * mask


class CleanLabelBadNets(BadNets):
    """BadNets on samples whose caption already names `target_class`; captions stay unchanged.

    poison_rate is a share of the whole training set (as for BadNets); if fewer captions name the
    target, all of them are poisoned and the plan records how many there were (`candidates`)."""

    name = "badnets_clean_label"

    def header(self) -> dict[str, Any]:
        return {**super().header(), "label_mode": "clean", "candidates": getattr(self, "_candidates", None)}

    def choose(self, num_samples: int, rng: np.random.Generator, ctx: Any) -> np.ndarray:
        if ctx is None:
            raise ValueError("attack=badnets_clean_label needs the training captions (a PlanContext)")
        cand = naming(ctx.captions(), self.target_class)
        self._candidates = int(len(cand))
        want = 0 if self.poison_rate == 0 else max(1, int(round(self.poison_rate * num_samples)))
        if want > len(cand):
            log.warning("badnets_clean_label: %d poisons wanted but only %d captions name %r; poisoning all",
                        want, len(cand), self.target_class)
        return np.sort(rng.choice(cand, size=min(want, len(cand)), replace=False)).astype(np.int64)

    def captions_for(self, idx: np.ndarray, rng: np.random.Generator, pool: Sequence[str],
                     ctx: Any) -> list[str]:
        """The samples' own captions, recorded (not replaced)."""
        caps = ctx.captions()
        return [caps[i] for i in idx]

    def apply(self, img: torch.Tensor, caption: str, entry: dict[str, Any]) -> tuple[torch.Tensor, str]:
        return self.trigger(img, entry), caption
