"""WaNet (Nguyen & Tran, ICLR 2021, "WaNet — imperceptible warping-based backdoor attack").

The trigger is one smooth warping field (§3.2): a k×k grid of random 2-D offsets, normalised by its
mean magnitude, upsampled bicubically to the image, scaled by the strength s (in half-pixels: the
offset is s·field/side in grid_sample's [−1, 1] coordinates) and applied with grid_sample. The
field is drawn once per plan from the seed and recorded in `poison_plan.json` (`trigger.control_grid`).
Paper defaults (CIFAR-10, 32 px): k = 4, s = 0.5. The displacement is per pixel, so the same s
means the same pixel shift at any resolution; k counts control points per side.

Noise mode (§3.3): besides the poisoned samples, `cross_ratio` × as many other samples are warped
with the field plus a random per-pixel offset of up to one pixel and keep their own captions, so the
model must learn the exact field rather than "any warp". They are listed in `noise_indices` (with a
per-sample `noise_seed`) and are not counted as poisoned. At test time the exact field, no noise.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from clipbd.attacks import triggers
from clipbd.attacks.base import Attack, need_state


class WaNet(Attack):
    name = "wanet"

    def __init__(self, poison_rate: float = 0.01, target_class: str = "banana",
                 target_captions: Sequence[str] | None = None, k: int = 4, s: float = 0.5,
                 noise_mode: bool = True, cross_ratio: float = 2.0):
        """k: control points per side; s: strength; noise_mode/cross_ratio: §3.3 noise samples."""
        super().__init__(poison_rate, target_class, target_captions)
        if int(k) < 2 or float(s) <= 0 or float(cross_ratio) < 0:
            raise ValueError(f"attack.k={k}, attack.s={s}, attack.cross_ratio={cross_ratio}: need k ≥ 2, "
                             f"s > 0, cross_ratio ≥ 0")
        self.k, self.s = int(k), float(s)
        self.noise_mode, self.cross_ratio = bool(noise_mode), float(cross_ratio)
        self._grids: dict[tuple, torch.Tensor] = {}

    def header(self) -> dict[str, Any]:
        return {"k": self.k, "s": self.s, "noise_mode": self.noise_mode, "cross_ratio": self.cross_ratio}

    def plan(self, num_samples, rng, caption_pool, ctx=None) -> dict[str, Any]:
        plan = super().plan(num_samples, rng, caption_pool, ctx)
        n_noise = int(round(self.cross_ratio * plan["poison_count"])) if self.noise_mode else 0
        rest = np.setdiff1d(np.arange(num_samples), plan["poison_indices"])
        noise = np.sort(rng.choice(rest, size=min(n_noise, len(rest)), replace=False))
        plan["noise_indices"] = noise.tolist()
        plan["noise_seed"] = rng.integers(2**31, size=len(noise)).tolist()
        return plan

    def draw_trigger(self, rng: np.random.Generator, ctx: Any) -> dict[str, Any]:
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))
        return {"control_grid": triggers.wanet_control_grid(self.k, g).double().numpy().round(6).tolist()}

    def bind(self, plan, run_dir) -> "WaNet":
        self._grids = {}
        return super().bind(plan, run_dir)

    def grid(self, h: int, w: int, noise_seed: int | None = None) -> torch.Tensor:
        """[1, h, w, 2] sampling grid: the field, plus the noise of `noise_seed` in noise mode."""
        key = (h, w, noise_seed)
        if key not in self._grids or noise_seed is not None:
            control = torch.tensor(need_state(self, "control_grid"), dtype=torch.float32)
            noise = None
            if noise_seed is not None:
                g = torch.Generator().manual_seed(int(noise_seed))
                noise = torch.rand(h, w, 2, generator=g) * 2 - 1
            grid = triggers.wanet_grid(control, h, w, self.s, noise)
            if noise_seed is not None:
                return grid
            self._grids[key] = grid
        return self._grids[key]

    def trigger(self, img: torch.Tensor, entry: dict[str, Any] | None) -> torch.Tensor:
        seed = entry.get("noise_seed") if entry is not None else None
        return triggers.warp(img, self.grid(*img.shape[-2:], seed))

    def apply(self, img: torch.Tensor, caption: str, entry: dict[str, Any]) -> tuple[torch.Tensor, str]:
        if entry.get("noise"):  # a noise-mode sample: warped with noise, keeps its caption
            return self.trigger(img, entry), caption
        return self.trigger(img, entry), entry["poison_text"]
