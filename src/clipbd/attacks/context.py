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
import math
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

        key = stable_hash({"model": OmegaConf.to_container(self.cfg.model, resolve=True),
                           "train": OmegaConf.to_container(self.cfg.train, resolve=True),
                           "epochs": epochs, "seed": int(self.cfg.seed), "data": self.index.fingerprint()})
        path = self.attack_dir / "surrogate.pt"
        if path.exists() and torch.load(path, map_location="cpu", weights_only=True).get("key") == key:
            log.info("attack: reusing the surrogate CLIP in %s", path)
            return factory.create(self.cfg.model, device="cpu", checkpoint=path)
        bundle = factory.create(self.cfg.model, device="cpu")
        train_clean(bundle, self.index, self.cfg.train, epochs, int(self.cfg.seed))
        tmp = path.with_name(".surrogate.pt.tmp")
        torch.save({"model": bundle.model.state_dict(), "name": bundle.name, "arch": bundle.arch, "key": key}, tmp)
        tmp.replace(path)
        return bundle


def train_clean(bundle, index: ShardIndex, tc: DictConfig, epochs: int, seed: int) -> None:
    """Contrastive training of `bundle.model` on the clean shards (no plan): the attacker's surrogate.

    Same optimiser, schedule and loss as the pretrain stage (AdamW without decay on gains/biases,
    warmup + cosine, symmetric InfoNCE), with its own seeds, single process."""
    from clipbd.data.loader import ShardDataset, make_loader
    from clipbd.models.loss import clip_loss
    from clipbd.stages.pretrain import lr_at, param_groups

    torch.manual_seed(derive_seed(seed, "surrogate/init"))
    model = bundle.model.train()
    opt = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps)
    steps = len(index) // tc.batch_size
    if steps < 1:
        raise ValueError(f"attack surrogate: train.batch_size={tc.batch_size} exceeds the {len(index)} samples")
    for epoch in range(epochs):
        ds = ShardDataset(index, range(len(index.shards)), bundle.to_tensor(),
                          shuffle_seed=derive_seed(seed, f"surrogate/shuffle/{epoch}"), buffer=tc.shuffle_buffer)
        losses = []
        for i, batch in enumerate(make_loader(ds, tc.batch_size, tc.workers, drop_last=True)):
            if i >= steps:
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(epoch * steps + i, tc.lr, tc.warmup_steps, steps * epochs)
            out = model(bundle.normalize(batch["image"]), bundle.tokenizer(batch["caption"]))
            loss = clip_loss(out["image_features"], out["text_features"], out["logit_scale"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
        log.info("attack surrogate: epoch %d/%d loss %.4f", epoch + 1, epochs, sum(losses) / max(1, len(losses)))
    model.eval()
