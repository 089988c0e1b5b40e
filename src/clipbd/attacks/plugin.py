"""A user-provided trigger, for attacks whose trigger generator clipbd cannot ship (ISSBA's
steganographic encoder, BLTO's generator, ...): name either

* `generator`: a dotted path to a callable `fn(images [B, 3, H, W] in [0, 1], **generator_kwargs)
  -> images [B, 3, H, W]` (sample-specific triggers: applied to each image as it is read), or
* `trigger`: a saved tensor file (torch.save, loaded weights-only): a tensor [3, h, w] added to the
  image (a perturbation; resized bilinearly), or a dict {"pattern": [3, h, w], "mask": [1|3, h, w]}
  pasted as x·(1 − m) + pattern·m (resized nearest-neighbour, so the patch keeps hard edges).

Poisoned samples get a target caption (dirty label); the same trigger is applied at test time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from hydra.utils import get_object

from clipbd.attacks.base import Attack


class PluginTrigger(Attack):
    name = "plugin"
    CALLABLE_KEYS = ("generator",)  # a dotted callable: allow-listed like a _target_ (clipbd.registry)

    def __init__(self, poison_rate: float = 0.01, target_class: str = "banana",
                 target_captions: Sequence[str] | None = None, generator: str | None = None,
                 generator_kwargs: Mapping[str, Any] | None = None, trigger: str | None = None):
        """generator | trigger: exactly one (module docstring)."""
        super().__init__(poison_rate, target_class, target_captions)
        if (generator is None) == (trigger is None):
            raise ValueError("attack=plugin: set exactly one of attack.generator=<module.fn> or "
                             "attack.trigger=<file.pt>")
        self.generator, self.trigger_file = generator, trigger
        self.kwargs = dict(generator_kwargs or {})
        if generator is not None:
            try:
                self._fn = get_object(generator)
            except Exception as e:  # noqa: BLE001 - import errors come in several types
                raise ValueError(f"attack.generator={generator}: cannot import it ({e})") from None
            if not callable(self._fn):
                raise ValueError(f"attack.generator={generator}: not callable")
        else:
            if not Path(trigger).is_file():
                raise FileNotFoundError(f"attack.trigger={trigger}: no such file")
            self._saved = torch.load(trigger, map_location="cpu", weights_only=True)
            ok = isinstance(self._saved, torch.Tensor) or (isinstance(self._saved, dict) and {"pattern", "mask"} <= set(self._saved))
            if not ok:
                raise ValueError(f"attack.trigger={trigger}: expected a tensor [3, h, w] or a dict with "
                                 f"'pattern' and 'mask'")

    def header(self) -> dict[str, Any]:
        return {"generator": self.generator, "generator_kwargs": self.kwargs, "trigger_file": self.trigger_file}

    def trigger(self, img: torch.Tensor, entry: dict[str, Any] | None) -> torch.Tensor:
        h, w = img.shape[-2:]
        if self.generator is not None:
            out = self._fn(img[None] if img.dim() == 3 else img, **self.kwargs)
            out = out[0] if img.dim() == 3 else out
            if out.shape != img.shape:
                raise ValueError(f"attack.generator={self.generator}: returned {tuple(out.shape)} for an "
                                 f"image of {tuple(img.shape)}")
            return out.to(img.dtype).clamp(0, 1)
        if isinstance(self._saved, torch.Tensor):
            delta = F.interpolate(self._saved[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
            return (img + delta.to(img.device, img.dtype)).clamp(0, 1)
        # a pasted patch keeps hard edges: nearest-neighbour resizing of pattern and mask
        near = lambda t: F.interpolate(t[None].float(), size=(h, w), mode="nearest")[0]  # noqa: E731
        pattern = near(self._saved["pattern"]).to(img.device, img.dtype)
        mask = near(self._saved["mask"].float().expand(3, -1, -1)).to(img.device, img.dtype)
        return (img * (1 - mask) + pattern * mask).clamp(0, 1)
