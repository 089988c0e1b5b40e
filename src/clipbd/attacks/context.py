"""What the poison stage lets an attack's `plan` see of the run (the I/O face; the attacks stay pure).

Most attacks need only the sample count and target captions. A few need more, and ask this object:
the clean-label variant reads the training captions, targeted data poisoning picks a held-out image,
the BadCLIP-style patch optimises against a surrogate CLIP (a given checkpoint, `model.checkpoint`,
or one trained here on the clean training shards, cached in `<run_dir>/attack/surrogate.pt`).
Everything is lazy and cached: an attack that asks nothing costs nothing.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from omegaconf import DictConfig

from clipbd.data.shards import ShardIndex, decode_image, iter_shard
from clipbd.utils import derive_seed, stable_hash

log = logging.getLogger("clipbd")


@dataclass
class PlanContext:
    cfg: DictConfig
    index: ShardIndex
    prompts: Callable[..., list[str]]  # fn(class_name, n, seed) -> captions in the data's style
    classes: list[str]
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def for_run(cls, cfg: DictConfig, index: ShardIndex) -> "PlanContext":
        """The context of the run `cfg` over the training shards of `index`."""
        from clipbd.data.sources import class_names, prompt_fn

        return cls(cfg=cfg, index=index, prompts=prompt_fn(cfg), classes=class_names(cfg))

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def attack_dir(self) -> Path:
        """Where attacks write plan-level files (patches, chosen images); the plan names them."""
        (d := self.run_dir / "attack").mkdir(parents=True, exist_ok=True)
        return d

    def captions(self) -> list[str]:
        """Every training caption, by global sample index (reads the shards once)."""
        if "captions" not in self._cache:
            self._cache["captions"] = [s.caption for sid in range(len(self.index.shards)) for s in self.index.read(sid)]
        return self._cache["captions"]

    @functools.cached_property
    def _bundle0(self):
        """An untrained model of the configured architecture: its resolution and preprocessing."""
        from clipbd.models import factory

        return factory.create(self.cfg.model, device="cpu")

    @property
    def image_size(self) -> int:
        return self._bundle0.image_size

    def test_samples(self) -> Iterator[tuple[int, torch.Tensor, int]]:
        """(index, image [3, H, W] at the model's resolution, label) over the held-out split."""
        from clipbd.data.sources import test_shards

        to_tensor, key = self._bundle0.to_tensor(), self.cfg.dataset.label_key
        i = 0
        for path in test_shards(self.cfg):
            for s in iter_shard(path):
                yield i, to_tensor(decode_image(s, f"{path}:{s.key}")), int(s.meta.get(key, -1))
                i += 1

    def train_images(self, indices) -> torch.Tensor:
        """[n, 3, H, W] clean training images at the model's resolution, in the order of `indices`."""
        want = {int(i): j for j, i in enumerate(indices)}
        out = [None] * len(want)
        to_tensor, offsets = self._bundle0.to_tensor(), self.index.offsets
        for sid, path in enumerate(self.index.shards):
            lo, hi = int(offsets[sid]), int(offsets[sid] + self.index.counts[sid])
            if not any(lo <= i < hi for i in want):
                continue
            for s in self.index.read(sid):
                j = want.get(lo + s.pos)
                if j is not None:
                    out[j] = to_tensor(decode_image(s, f"{path}:{s.key}"))
        return torch.stack(out)

    def surrogate(self, checkpoint: str | None = None, epochs: int = 1):
        """A CLIP to optimise triggers against: `checkpoint`, else `model.checkpoint`, else one
        trained here for `epochs` on the clean training shards (the run's model and train config),
        cached in attack/surrogate.pt under a key of everything it was trained from."""
        from clipbd.models import factory

        ckpt = checkpoint or self.cfg.model.checkpoint
        if ckpt:
            bundle = factory.create(self.cfg.model, device="cpu", checkpoint=ckpt)
        else:
            bundle = self._trained_surrogate(int(epochs))
        bundle.model.eval()
        return bundle

    def _trained_surrogate(self, epochs: int):
        from omegaconf import OmegaConf

        from clipbd.models import factory
        from clipbd.models.train import train_clean

        key = stable_hash({"model": OmegaConf.to_container(self.cfg.model, resolve=True),
                           "train": OmegaConf.to_container(self.cfg.train, resolve=True),
                           "epochs": epochs, "seed": int(self.cfg.seed), "data": self.index.fingerprint()})
        path = self.attack_dir / "surrogate.pt"
        if path.exists() and torch.load(path, map_location="cpu", weights_only=True).get("key") == key:
            log.info("attack: reusing the surrogate CLIP in %s", path)
            return factory.create(self.cfg.model, device="cpu", checkpoint=path)
        bundle = factory.create(self.cfg.model, device="cpu")
        train_clean(bundle, self.index, self.cfg.train, epochs, int(self.cfg.seed))
        factory.save_checkpoint(path, bundle, key=key)
        return bundle
