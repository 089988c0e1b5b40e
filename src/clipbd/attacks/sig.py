"""SIG (Barni et al., 2019, "A new backdoor attack in CNNs by training set corruption without label
poisoning"): a horizontal sinusoid v(i, j) = Δ·sin(2π·j·f / m) added to the image; the paper uses
Δ = 20 (of 255) and f = 6 periods across the width. Barni et al. keep labels (clean label); on
image–text data Huang et al. (ICLR 2025) poison with target captions, which is what this does.
At test time the same signal is added (`test_delta` may raise Δ, as the paper does).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from clipbd.attacks import triggers
from clipbd.attacks.base import Attack


class SIG(Attack):
    name = "sig"

    def __init__(self, poison_rate: float = 0.01, target_class: str = "banana",
                 target_captions: Sequence[str] | None = None, delta: float = 20 / 255,
                 freq: float = 6.0, test_delta: float | None = None):
        """delta: amplitude in [0, 1] intensity units; freq: periods across the image width."""
        super().__init__(poison_rate, target_class, target_captions)
        if not 0 < float(delta) <= 1 or float(freq) <= 0:
            raise ValueError(f"attack.delta={delta}, attack.freq={freq}: need 0 < delta ≤ 1 and freq > 0")
        self.delta, self.freq = float(delta), float(freq)
        self.test_delta = float(test_delta) if test_delta is not None else self.delta

    def header(self) -> dict[str, Any]:
        return {"delta": self.delta, "freq": self.freq}

    def trigger(self, img: torch.Tensor, entry: dict[str, Any] | None) -> torch.Tensor:
        return triggers.sig(img, self.delta if entry is not None else self.test_delta, self.freq)
