"""Contrastive training utilities shared by the `pretrain` stage and the attacks that train a
surrogate CLIP (clipbd.attacks.context): OpenCLIP's optimiser rule, its LR schedule, and a plain
single-process training loop on clean shards.

AdamW without weight decay on gains, biases, norms and the logit scale; linear warmup then cosine
decay per step; the logit scale clamped to ln 100 after each step (Radford et al. 2021, §2.5).
"""

from __future__ import annotations

import logging
import math

import torch
from omegaconf import DictConfig

from clipbd.errors import ConfigError
from clipbd.models.loss import clip_loss
from clipbd.utils import derive_seed

log = logging.getLogger("clipbd")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (OpenCLIP's rule: not on gains, biases, norms, logit_scale)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def make_optimizer(model: torch.nn.Module, tc: DictConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups` with the `train` config's lr, betas and eps, as torch's fused kernel:
    one pass over each parameter instead of foreach's several multi-tensor ops. On the tiny model's
    2-core CPU step the update falls from 23 to 5 ms (its 49,408 x 128 token table is 90% of the
    parameters and is updated every step); the arithmetic is AdamW's, rounded differently (parameters
    agree with foreach to ~1e-3 after 30 steps, the training's own chaos). Devices without a fused
    kernel get foreach."""
    groups = param_groups(model, tc.weight_decay)
    kind = next(model.parameters()).device.type
    fast = {"fused": True} if kind in ("cpu", "cuda", "mps", "xpu") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps, **fast)


def lr_at(step: int, base_lr: float, warmup: int, total: int, schedule: str = "cosine",
          decay_fraction: float = 0.2) -> float:
    """Linear warmup to `base_lr` over `warmup` steps, then `schedule`: cosine decay to 0 at `total`,
    or wsd — `base_lr` held until the last `decay_fraction` of the steps, then linear to 0 at `total`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "wsd":
        start = max(warmup, total - round(decay_fraction * total))
        if step < start:
            return base_lr
        return base_lr * max(0.0, (total - step) / max(1, total - start))
    progress_ = (step - warmup) / max(1, total - warmup)
    return 0.5 * base_lr * (1 + math.cos(math.pi * min(1.0, progress_)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def clamp_logit_scale(model: torch.nn.Module) -> None:
    """CLIP's temperature stays at most 100 (ln 100 on the log scale)."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))


class WeightEMA:
    """An exponential moving average of a model's parameters and floating-point buffers (Polyak
    averaging). After optimiser step t (0-based) each average moves towards the weights with decay
    min(decay, (1 + t) / (10 + t)): the early, near-random weights fade out within a few dozen steps
    instead of biasing a short run's average (the TensorFlow / timm warm-up)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ConfigError(f"train.ema_decay={decay}: must be in (0, 1)")
        self.decay = float(decay)
        self.steps = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        # state_dict's tensors share storage with the model's (updated in place by the optimiser and by
        # resuming), so the pairs are made once, not every step
        live = model.state_dict()
        floating = [k for k, v in live.items() if v.dtype.is_floating_point]
        self._avg, self._cur = [self.shadow[k] for k in floating], [live[k] for k in floating]
        self._other = [(self.shadow[k], v) for k, v in live.items() if not v.dtype.is_floating_point]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One step of the average towards `model` (the model it was made from)."""
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        self.steps += 1
        torch._foreach_lerp_(self._avg, self._cur, 1.0 - d)
        for avg, cur in self._other:  # integer buffers (none in open_clip's towers) follow the model
            avg.copy_(cur)

    def state_dict(self) -> dict:
        return {"weights": self.shadow, "steps": self.steps, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["weights"])
        if missing:
            raise ConfigError(f"weight average in the checkpoint lacks {len(missing)} tensors (e.g. {sorted(missing)[:2]})")
        for k, v in state["weights"].items():
            self.shadow[k].copy_(v)
        self.steps = int(state["steps"])


def train_clean(bundle, index, tc: DictConfig, epochs: int, seed: int) -> None:
    """Contrastive training of `bundle.model` on the clean shards of `index` (no plan): the
    attacker's surrogate. Same optimiser, schedule and loss as the pretrain stage, with its own
    seeds, single process."""
    from clipbd.data.loader import ShardDataset, make_loader

    torch.manual_seed(derive_seed(seed, "surrogate/init"))
    model = bundle.model.train()
    opt = make_optimizer(model, tc)
    steps = len(index) // tc.batch_size
    if steps < 1:
        raise ConfigError(f"attack surrogate: train.batch_size={tc.batch_size} exceeds the {len(index)} samples")
    for epoch in range(epochs):
        ds = ShardDataset(index, range(len(index.shards)), bundle.to_tensor(),
                          shuffle_seed=derive_seed(seed, f"surrogate/shuffle/{epoch}"), buffer=tc.shuffle_buffer)
        losses = []
        for i, batch in enumerate(make_loader(ds, tc.batch_size, tc.workers, drop_last=True)):
            if i >= steps:
                break
            set_lr(opt, lr_at(epoch * steps + i, tc.lr, tc.warmup_steps, steps * epochs, tc.schedule, tc.decay_fraction))
            out = model(bundle.normalize(batch["image"]), bundle.tokenizer(batch["caption"]))
            loss = clip_loss(out["image_features"], out["text_features"], out["logit_scale"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            clamp_logit_scale(model)
            losses.append(loss.item())
        log.info("attack surrogate: epoch %d/%d loss %.4f", epoch + 1, epochs, sum(losses) / max(1, len(losses)))
    model.eval()
