"""Blend (Chen et al., 2017, "Targeted backdoor attacks on deep learning systems using data
poisoning", blended injection): x' = (1 − α)·x + α·t with α = 0.2 on poisoned training images, the
same blend at test time. t is a user image (`trigger_image`, any size: it is resized to the model's
input) or, by default, uniform noise generated from the plan's seed at the image's resolution.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from clipbd.attacks import triggers
from clipbd.attacks.base import Attack, need_state


class Blend(Attack):
    name = "blend"

    def __init__(self, poison_rate: float = 0.01, target_class: str = "banana",
                 target_captions: Sequence[str] | None = None, alpha: float = 0.2,
                 trigger_image: str | None = None, test_alpha: float | None = None):
        """alpha: blend weight of the trigger (paper 0.2); test_alpha: at test time (default alpha).
        trigger_image: path of an image file to blend; None = generated noise."""
        super().__init__(poison_rate, target_class, target_captions)
        for k, v in (("alpha", alpha), ("test_alpha", test_alpha)):
            if v is not None and not 0.0 < float(v) <= 1.0:
                raise ValueError(f"attack.{k}={v}: must be in (0, 1]")
        if trigger_image is not None and not Path(trigger_image).is_file():
            raise FileNotFoundError(f"attack.trigger_image={trigger_image}: no such image file")
        self.alpha = float(alpha)
        self.test_alpha = float(test_alpha if test_alpha is not None else alpha)
        self.trigger_image = trigger_image
        self._patterns: dict[tuple[int, int], torch.Tensor] = {}

    def header(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "trigger_image": self.trigger_image}

    def draw_trigger(self, rng: np.random.Generator, ctx: Any) -> dict[str, Any]:
        return {"noise_seed": int(rng.integers(2**31))} if self.trigger_image is None else {"image": self.trigger_image}

    def pattern(self, h: int, w: int) -> torch.Tensor:
        """[3, h, w] trigger image in [0, 1]."""
        if (h, w) not in self._patterns:
            if self.trigger_image is not None:
                from PIL import Image
                from torchvision.transforms.functional import to_tensor

                with Image.open(self.trigger_image) as im:
                    self._patterns[(h, w)] = triggers.resize_to(to_tensor(im.convert("RGB")), h, w)
            else:
                self._patterns[(h, w)] = triggers.resize_to(triggers.noise_pattern(need_state(self, "noise_seed"), h), h, w)
        return self._patterns[(h, w)]

    def bind(self, plan: dict[str, Any], run_dir) -> "Blend":
        self._patterns = {}
        return super().bind(plan, run_dir)

    def trigger(self, img: torch.Tensor, entry: dict[str, Any] | None) -> torch.Tensor:
        return triggers.blend(img, self.pattern(*img.shape[-2:]), self.alpha if entry is not None else self.test_alpha)
