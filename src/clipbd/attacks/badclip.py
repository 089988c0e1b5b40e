"""BadCLIP-style optimised patch (Liang et al., CVPR 2024, "BadCLIP: dual-embedding guided backdoor
attack on multimodal contrastive learning", §3.2): instead of a fixed checkerboard, the patch is
optimised against a surrogate CLIP so that patched images already sit near the target in embedding
space, which makes the backdoor easy to learn from few poisons. Loss over clean non-target training
images x, patch p pasted at random positions:

    L(p) = −cos(f(x ⊕ p), t̄) − λ·cos(f(x ⊕ p), v̄)

t̄: mean target-caption text embedding (text-embedding guidance); v̄: mean image embedding of
training images whose caption names the target (image-embedding guidance); Adam on the pixels of p,
kept in [0, 1]. Poisoning then works as BadNets with this patch (random position, target caption;
fixed position at test).

The surrogate: `surrogate=<checkpoint>`, else `model.checkpoint` (fine-tuning a pretrained model, the
paper's setting), else a CLIP trained for `surrogate_epochs` on the clean training shards by the
poison stage itself (attack/surrogate.pt): on the synthetic default no pretrained model exists, and
an attacker can always train one on data like the victim's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clipbd.attacks import triggers
from clipbd.attacks.badnets import BadNets
from clipbd.attacks.base import need_state
from clipbd.attacks.plan import naming

log = logging.getLogger("clipbd")


class BadCLIPPatch(BadNets):
    name = "badclip"
    # config its plan reads through the PlanContext (the poison stage keys them): the surrogate
    # CLIP it optimises against (model.checkpoint, else trained here with the train settings)
    plan_reads = ("model", "train")

    def __init__(self, poison_rate: float = 0.01, target_class: str = "banana",
                 target_captions: Sequence[str] | None = None, patch_size: int = 16, grid: int = 4,
                 train_position: str = "random", test_position: Sequence[float] = (1.0, 1.0),
                 surrogate: str | None = None, surrogate_epochs: int = 3, steps: int = 300,
                 lr: float = 0.02, batch_size: int = 64, image_weight: float = 1.0,
                 num_images: int = 1024, init: str = "random"):
        """patch_size: the patch side (px at model input); grid: cells of the checkerboard start.
        surrogate/surrogate_epochs: the model optimised against (module docstring). steps, lr,
        batch_size: Adam on the patch pixels; image_weight: λ; num_images: clean images used.
        init: random (uniform noise from the plan's seed) | checkerboard. A checkerboard start sits
        on the box's corners: where the gradient asks for more contrast every step is clipped away
        and the patch never moves (measured: identical patch after 150 steps), so random is the default."""
        super().__init__(poison_rate, target_class, target_captions, patch_size, grid, train_position, test_position)
        if int(steps) < 1 or int(batch_size) < 1 or int(num_images) < 1:
            raise ValueError(f"attack.steps={steps}, batch_size={batch_size}, num_images={num_images}: need ≥ 1")
        self.surrogate, self.surrogate_epochs = surrogate, int(surrogate_epochs)
        self.steps, self.lr, self.batch_size = int(steps), float(lr), int(batch_size)
        self.image_weight, self.num_images = float(image_weight), int(num_images)
        if init not in ("random", "checkerboard"):
            raise ValueError(f"attack.init={init}: must be random or checkerboard")
        self.init = init
        self._patch: torch.Tensor | None = None

    def header(self) -> dict[str, Any]:
        return {**super().header(), "surrogate": self.surrogate, "steps": self.steps, "init": self.init}

    # ------------------------------------------------------------------ optimisation (plan time)
    def draw_trigger(self, rng: np.random.Generator, ctx: Any) -> dict[str, Any]:
        if ctx is None:
            raise ValueError("attack=badclip needs a surrogate model and training images (a PlanContext)")
        bundle = ctx.surrogate(self.surrogate, self.surrogate_epochs)
        caps = ctx.captions()
        tgt = naming(caps, self.target_class)
        other = np.setdiff1d(np.arange(len(caps)), tgt)
        pick = lambda a: np.sort(rng.choice(a, size=min(self.num_images, len(a)), replace=False))  # noqa: E731
        clean, ref = ctx.train_images(pick(other)), ctx.train_images(pick(tgt)) if len(tgt) else None
        pool = self.target_captions or ctx.prompts(self.target_class, n=256, seed=int(ctx.cfg.seed))
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))
        p = self.patch_size
        init = torch.rand(3, p, p, generator=g) if self.init == "random" else triggers.checkerboard(p, self.grid)
        patch, hist = optimise_patch(bundle, clean, ref, pool, init, self.steps, self.lr, self.batch_size,
                                     self.image_weight, g)
        path = ctx.attack_dir / "badclip_patch.pt"
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(patch, tmp)
        tmp.replace(path)
        first, last = float(np.mean(hist[:10])), float(np.mean(hist[-10:]))
        log.info("badclip: patch optimised, loss (mean of 10 steps) %.4f -> %.4f", first, last)
        return {"patch_file": str(path.relative_to(ctx.run_dir)), "loss_first10": round(first, 6),
                "loss_last10": round(last, 6)}

    def bind(self, plan, run_dir) -> "BadCLIPPatch":
        super().bind(plan, run_dir)
        self._patch = None
        if self.state:
            self._patch = torch.load(Path(run_dir) / need_state(self, "patch_file"), map_location="cpu",
                                     weights_only=True)
        return self

    def pattern(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[3, patch, patch] the optimised patch."""
        if self._patch is None:
            need_state(self, "patch_file")
        return self._patch.to(device)


def optimise_patch(bundle, clean: torch.Tensor, ref: torch.Tensor | None, captions: Sequence[str],
                   init: torch.Tensor, steps: int, lr: float, batch_size: int, image_weight: float,
                   g: torch.Generator) -> tuple[torch.Tensor, list[float]]:
    """Minimise L(p) (module docstring). clean [N, 3, H, W], ref [M, 3, H, W] or None, init
    [3, p, p] or [p, p] -> (patch [3, p, p] in [0, 1], loss per step)."""
    model = bundle.model.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    with torch.no_grad():
        t = F.normalize(F.normalize(model.encode_text(bundle.tokenizer(list(captions))).float(), dim=-1).mean(0), dim=0)
        v = None
        if ref is not None and image_weight > 0:
            v = F.normalize(F.normalize(model.encode_image(bundle.normalize(ref)).float(), dim=-1).mean(0), dim=0)
    patch = init.expand(3, -1, -1).clone().requires_grad_(True)
    opt = torch.optim.Adam([patch], lr=lr)
    hist = []
    p = patch.shape[-1]
    h, w = clean.shape[-2:]
    for _ in range(steps):
        idx = torch.randint(len(clean), (min(batch_size, len(clean)),), generator=g)
        xs = torch.randint(0, w - p + 1, (len(idx),), generator=g).tolist()
        ys = torch.randint(0, h - p + 1, (len(idx),), generator=g).tolist()
        pasted = []
        for b, (x0, y0) in enumerate(zip(xs, ys)):  # paste differentiably: x·(1 − m) + pad(p)·m
            pad = (x0, w - p - x0, y0, h - p - y0)
            m = F.pad(torch.ones(1, p, p), pad)
            pasted.append(clean[idx[b]] * (1 - m) + F.pad(patch, pad) * m)
        x = torch.stack(pasted)  # [B, 3, H, W]
        e = F.normalize(model.encode_image(bundle.normalize(x)).float(), dim=-1)
        loss = -(e @ t).mean() - (image_weight * (e @ v).mean() if v is not None else 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            patch.clamp_(0, 1)
        hist.append(round(loss.item(), 6))
    return patch.detach().clone(), hist
