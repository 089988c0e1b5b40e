"""Nashville (the Instagram filter used as a trigger by Liu et al. 2019 (ABS) and by Huang et al.,
ICLR 2025): the whole image is re-coloured; the caption is replaced by a target caption. The filter
is CSSgram's definition, written out in clipbd.attacks.triggers.nashville (no registry package:
`pilgram` implements the same CSS and would be one more pinned dependency). Same filter at test time.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from clipbd.attacks import triggers
from clipbd.attacks.base import Attack


class Nashville(Attack):
    name = "nashville"

    def __init__(self, poison_rate: float = 0.01, target_class: str = "banana",
                 target_captions: Sequence[str] | None = None):
        """A filter on the whole image (module docstring); the base class holds every parameter."""
        super().__init__(poison_rate, target_class, target_captions)

    def trigger(self, img: torch.Tensor, entry: dict[str, Any] | None) -> torch.Tensor:
        return triggers.nashville(img)
