"""BadNets (Gu et al., 2017) as used on CLIP by Carlini & Terzis (2022) and Huang et al. (ICLR 2025):
a black/white grid patch pasted at a random position of each poisoned training image, whose caption
is replaced by a caption naming the target class. At test time the patch goes at a fixed position.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from clipbd.attacks.plan import choose_indices


class BadNets:
    name = "badnets"

    def __init__(self, poison_rate: float = 1e-4, target_class: str = "banana",
                 target_captions: Sequence[str] | None = None, patch_size: int = 16, grid: int = 4,
                 train_position: str = "random", test_position: Sequence[float] = (1.0, 1.0)):
        """patch_size: side in pixels at the model's input resolution (paper: 16 at 224 px).
        grid: cells per side of the black/white checkerboard. Positions are fractions (x, y) of the
        free range [0, size − patch]: (1, 1) is the bottom-right corner.
        target_captions: poison captions to draw from; None = the dataset's prompts for target_class."""
        if patch_size < 1 or grid < 1 or patch_size % grid:
            raise ValueError(f"attack.patch_size={patch_size}, attack.grid={grid}: need patch_size ≥ 1 "
                             f"and a multiple of grid")
        if train_position not in ("random", "fixed"):
            raise ValueError(f"attack.train_position={train_position}: must be random or fixed")
        self.poison_rate = float(poison_rate)
        self.target_class = target_class
        self.target_captions = list(target_captions) if target_captions else None
        self.patch_size = int(patch_size)
        self.grid = int(grid)
        self.train_position = train_position
        self.test_position = tuple(float(v) for v in test_position)

    # ------------------------------------------------------------------ plan (which samples, how)
    def plan(self, num_samples: int, rng: np.random.Generator, caption_pool: Sequence[str]) -> dict[str, Any]:
        idx = choose_indices(num_samples, self.poison_rate, rng)
        pool = self.target_captions or list(caption_pool)
        if not pool:
            raise ValueError("attack: no target captions (set attack.target_captions or dataset.prompts)")
        if self.train_position == "random":
            pos = rng.random((len(idx), 2)).round(6).tolist()
        else:
            pos = [list(self.test_position)] * len(idx)
        texts = [pool[i] for i in rng.integers(0, len(pool), size=len(idx))]
        return {
            "attack": self.name, "threat_model": "single", "num_samples": int(num_samples),
            "poison_rate": self.poison_rate, "poison_count": int(len(idx)),
            "backdoor_label": self.target_class, "target_class": self.target_class,
            "patch_size": self.patch_size, "patch_location": self.train_position,
            "poison_indices": idx.tolist(), "poison_text": texts, "trigger_position": pos,
        }

    # ------------------------------------------------------------------ triggers (pure)
    def pattern(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[patch, patch] checkerboard of 0/1, `grid` cells per side."""
        cell = self.patch_size // self.grid
        ij = torch.arange(self.grid, device=device)
        board = ((ij[:, None] + ij[None, :]) % 2).float()
        return board.repeat_interleave(cell, 0).repeat_interleave(cell, 1)

    def stamp(self, img: torch.Tensor, position: Sequence[float]) -> torch.Tensor:
        """img [3, H, W] (or [B, 3, H, W]) in [0, 1] -> copy with the patch at fractional `position`."""
        h, w = img.shape[-2:]
        p = self.patch_size
        if p > min(h, w):
            raise ValueError(f"attack.patch_size={p} is larger than the {h}×{w} image")
        x = int(round(float(position[0]) * (w - p)))
        y = int(round(float(position[1]) * (h - p)))
        out = img.clone()
        out[..., y:y + p, x:x + p] = self.pattern(img.device).to(img.dtype)
        return out

    def apply(self, img: torch.Tensor, caption: str, entry: dict[str, Any]) -> tuple[torch.Tensor, str]:
        """A planned training sample: trigger at its recorded position, caption replaced."""
        return self.stamp(img, entry["trigger_position"]), entry["poison_text"]

    def apply_test(self, img: torch.Tensor) -> torch.Tensor:
        """Test-time trigger (fixed position), for ASR."""
        return self.stamp(img, self.test_position)
