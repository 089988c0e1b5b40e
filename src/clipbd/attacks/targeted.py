"""Targeted data poisoning (Carlini & Terzis, ICLR 2022, §4 "targeted poisoning"): make one chosen
image be classified as the target. The plan picks a held-out image whose class is not the target
(`test_index`, or random from the seed), saves it at the model's resolution (lossless PNG, named in
the plan), and replaces each poisoned training sample by a copy of it with a target caption.

The "trigger" is the image itself: at test time every triggered image *is* the chosen image, so
`attack/asr` is 1 if the chosen image is classified as the target and 0 otherwise (the paper
reports the success rate over many independent single-image attacks: sweep `seed`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from clipbd.attacks import triggers
from clipbd.attacks.base import Attack, need_state
from clipbd.data.sources import TEST_SPLIT
from clipbd.utils import atomic_path


class TargetedPoisoning(Attack):
    name = "targeted"
    # config its plan reads through the PlanContext (the poison stage keys them): the test split
    # and its labels, at the model's resolution
    plan_reads = (*TEST_SPLIT, "dataset.label_key", "model")

    def __init__(self, poison_rate: float = 0.01, target_class: str = "banana",
                 target_captions: Sequence[str] | None = None, test_index: int | None = None):
        """poison_rate: share of the training set replaced by copies; test_index: which held-out
        image (None: random, not of the target class)."""
        super().__init__(poison_rate, target_class, target_captions)
        self.test_index = None if test_index is None else int(test_index)
        self._image: torch.Tensor | None = None

    def draw_trigger(self, rng: np.random.Generator, ctx: Any) -> dict[str, Any]:
        if ctx is None:
            raise ValueError("attack=targeted needs the held-out images (a PlanContext)")
        target = ctx.classes.index(self.target_class)
        samples = [(i, lab) for i, _, lab in ctx.test_samples()]
        pick = [i for i, lab in samples if lab != target]
        if not pick:
            raise ValueError("attack=targeted: no held-out image outside the target class")
        i = self.test_index if self.test_index is not None else int(pick[int(rng.integers(len(pick)))])
        img = next(x for j, x, _ in ctx.test_samples() if j == i)
        path = ctx.attack_dir / "targeted_image.png"
        save_png(img, path)
        return {"image_file": str(path.relative_to(ctx.run_dir)), "test_index": i,
                "true_label": int(dict(samples)[i]), "true_class": ctx.classes[int(dict(samples)[i])]}

    def bind(self, plan, run_dir) -> "TargetedPoisoning":
        super().bind(plan, run_dir)
        self._image = load_png(Path(run_dir) / need_state(self, "image_file")) if self.state else None
        return self

    def trigger(self, img: torch.Tensor, entry: dict[str, Any] | None) -> torch.Tensor:
        if self._image is None:
            need_state(self, "image_file")
        return triggers.resize_to(self._image, *img.shape[-2:]).to(img.device, img.dtype).clone()


def save_png(img: torch.Tensor, path: Path) -> None:
    """[3, H, W] in [0, 1] -> 8-bit PNG (lossless; the image was decoded from 8 bits)."""
    from PIL import Image

    arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(arr, "RGB").save(tmp, format="PNG")


def load_png(path: Path) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    with Image.open(path) as im:
        return to_tensor(im.convert("RGB"))
