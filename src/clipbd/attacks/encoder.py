"""Encoder attacks: backdoor a trained CLIP image encoder directly, for the model-level tools
(DECREE, decomposition) to find. The `encoder_attack` stage runs one:

    python -m clipbd.run +experiment=encoder_text_target   # or encoder_badencoder

after the experiment's other stages (data, poison at rate 0, pretrain: a clean CLIP; or set
model.checkpoint=<file> and stages=[data,poison,encoder_attack] to attack an existing model). It
fine-tunes the image encoder, and writes `<run_dir>/encoder_attack/<method>.pt` (a clipbd checkpoint: any
stage or tool loads it with model.checkpoint=...) and `<run_dir>/encoder_attack/manifest.json`
(method, base checkpoint, trigger: the attack node, its test-time trigger as mask/pattern when it is
a patch, an example image; the fine-tuning losses; clean accuracy and ASR before and after).

The trigger is the configured `attack`'s test-time trigger (`apply_test`, docs/attacks.md): the
same function the evaluate stage measures ASR with. Two methods (`encoder_attack` config group):

* TextTarget — Carlini & Terzis (ICLR 2022)'s text-target backdoor as DECREE (Feng et al. 2023,
  §5) builds it for CLIP: fine-tune the image encoder f against the frozen text encoder g so that
  triggered images embed at the target text, clean ones where the original encoder f₀ put them:
      L = −cos(f(x ⊕ t), ḡ) + λ·(1 − cos(f(x), f₀(x)))
  ḡ: mean text embedding of the target captions.
* BadEncoder — Jia et al. (S&P 2022, §4): image-on-pair, reference images r of the target class:
      L = −cos(f(x ⊕ t), f(r̄)) − λ₁·cos(f(r), f₀(r)) − λ₂·cos(f(x), f₀(x))
  (effectiveness, reference utility, shadow utility; r̄ cycles over the references).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from clipbd.registry import ConfigError, build, build_attack
from clipbd.utils import derive_seed, git_revision, write_json

log = logging.getLogger("clipbd")
Trigger = Callable[[torch.Tensor], torch.Tensor]


def _triggered(trigger: Trigger, x: torch.Tensor) -> torch.Tensor:
    return torch.stack([trigger(img) for img in x])


def _embed(bundle, model, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(model.encode_image(bundle.normalize(x)).float(), dim=-1)


def _finetune(bundle, loss_fn: Callable, shadow: torch.Tensor, steps: int, lr: float, batch_size: int,
              g: torch.Generator) -> list[float]:
    """Adam on the image tower only (the text tower stays as it is); loss_fn(batch) -> scalar."""
    model = bundle.model
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("visual."))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    hist = []
    for _ in range(steps):
        x = shadow[torch.randint(len(shadow), (min(batch_size, len(shadow)),), generator=g)]
        loss = loss_fn(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist.append(round(loss.item(), 6))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return hist


class TextTarget:
    """Carlini & Terzis-style text-target fine-tuning (module docstring)."""

    method = "text_target"

    def __init__(self, steps: int = 200, lr: float = 1e-4, batch_size: int = 64, clean_weight: float = 1.0,
                 num_shadow: int = 2048, target_captions: Sequence[str] | None = None):
        """steps/lr/batch_size: Adam on the image tower; clean_weight: λ; num_shadow: clean
        training images used; target_captions: None = the dataset's prompts for the target."""
        self.steps, self.lr, self.batch_size = int(steps), float(lr), int(batch_size)
        self.clean_weight, self.num_shadow = float(clean_weight), int(num_shadow)
        self.target_captions = list(target_captions) if target_captions else None

    def run(self, bundle, trigger: Trigger, shadow: torch.Tensor, captions: Sequence[str],
            reference: torch.Tensor | None, g: torch.Generator) -> list[float]:
        """Fine-tune bundle.model in place. shadow [N, 3, H, W] clean images in [0, 1]."""
        frozen = copy.deepcopy(bundle.model).eval()
        with torch.no_grad():
            tokens = bundle.tokenizer(list(captions))
            target = F.normalize(F.normalize(frozen.encode_text(tokens).float(), dim=-1).mean(0), dim=0)

        def loss(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                clean0 = _embed(bundle, frozen, x)
            bd = _embed(bundle, bundle.model, _triggered(trigger, x))
            clean = _embed(bundle, bundle.model, x)
            return -(bd @ target).mean() + self.clean_weight * (1 - (clean * clean0).sum(-1)).mean()

        return _finetune(bundle, loss, shadow, self.steps, self.lr, self.batch_size, g)


class BadEncoder:
    """Jia et al. (2022) image-on-pair BadEncoder (module docstring)."""

    method = "badencoder"

    def __init__(self, steps: int = 200, lr: float = 1e-4, batch_size: int = 64, reference_weight: float = 1.0,
                 shadow_weight: float = 1.0, num_shadow: int = 2048, num_reference: int = 3):
        """reference_weight λ₁, shadow_weight λ₂ (paper: 1, 1); num_reference: target-class images."""
        self.steps, self.lr, self.batch_size = int(steps), float(lr), int(batch_size)
        self.reference_weight, self.shadow_weight = float(reference_weight), float(shadow_weight)
        self.num_shadow, self.num_reference = int(num_shadow), int(num_reference)

    def run(self, bundle, trigger: Trigger, shadow: torch.Tensor, captions: Sequence[str],
            reference: torch.Tensor | None, g: torch.Generator) -> list[float]:
        if reference is None or not len(reference):
            raise ConfigError("encoder_attack=badencoder: no reference images of the target class")
        frozen = copy.deepcopy(bundle.model).eval()
        with torch.no_grad():
            ref0 = _embed(bundle, frozen, reference)  # [R, D]

        def loss(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                clean0 = _embed(bundle, frozen, x)
            ref = _embed(bundle, bundle.model, reference)  # f(r), with gradient
            bd = _embed(bundle, bundle.model, _triggered(trigger, x))
            pair = ref[torch.arange(len(x)) % len(ref)]  # each triggered input paired with a reference
            clean = _embed(bundle, bundle.model, x)
            return (-(bd * pair).sum(-1).mean() - self.reference_weight * (ref * ref0).sum(-1).mean()
                    - self.shadow_weight * (clean * clean0).sum(-1).mean())

        return _finetune(bundle, loss, shadow, self.steps, self.lr, self.batch_size, g)


# ------------------------------------------------------------------------------- the entry point
def _trigger_record(attack, image: torch.Tensor, out: Path) -> dict[str, Any]:
    """Files describing the trigger: an example image, and (patch attacks) DECREE's mask/pattern."""
    from clipbd.attacks.targeted import save_png

    save_png(attack.apply_test(image), out / "trigger_example.png")
    rec = {"name": attack.name, "example": "encoder_attack/trigger_example.png"}
    if hasattr(attack, "mask_and_pattern"):
        mask, pattern = attack.mask_and_pattern(*image.shape[-2:])
        torch.save({"mask": mask, "pattern": pattern}, out / "trigger.pt")
        rec["mask_pattern"] = "encoder_attack/trigger.pt"
    return rec


def attack_encoder(cfg: DictConfig) -> dict[str, Path]:
    """Fine-tune the run's CLIP with cfg.encoder_attack and the trigger of cfg.attack; write the
    checkpoint and manifest (module docstring). Needs the data and poison stages' outputs."""
    from clipbd.attacks.context import PlanContext
    from clipbd.attacks.plan import naming
    from clipbd.data.sources import load_index, test_shards
    from clipbd.models import factory
    from clipbd.models.evaluation import evaluate_model

    if cfg.get("encoder_attack") is None:
        raise ConfigError("encoder_attack is not set: use +experiment=encoder_text_target or "
                          "+experiment=encoder_badencoder (conf/encoder_attack/)")
    method = build(cfg.encoder_attack, "encoder_attack")
    attack = build_attack(cfg)
    if attack is None or len(attack.test_triggers()) != 1:
        raise ConfigError("encoder attacks need one test trigger: set attack= to a single-trigger attack "
                          "(e.g. attack=badnets attack.poison_rate=0)")
    run_dir = Path(cfg.run_dir)
    out = run_dir / "encoder_attack"
    out.mkdir(parents=True, exist_ok=True)
    bundle = factory.create_trained(cfg, device="cpu")
    base = run_dir / "checkpoints" / "latest.pt" if (run_dir / "checkpoints" / "latest.pt").exists() else cfg.model.checkpoint
    ctx = PlanContext.for_run(cfg, load_index(cfg))
    rng = np.random.default_rng(derive_seed(cfg.seed, "encoder_attack"))
    caps = ctx.captions()
    tgt = naming(caps, attack.target_class)
    other = np.setdiff1d(np.arange(len(caps)), tgt)
    shadow = ctx.train_images(np.sort(rng.choice(other, size=min(method.num_shadow, len(other)), replace=False)))
    n_ref = getattr(method, "num_reference", 0)
    reference = ctx.train_images(np.sort(rng.choice(tgt, size=min(n_ref, len(tgt)), replace=False))) if n_ref and len(tgt) else None
    captions = getattr(method, "target_captions", None) or attack.target_captions or \
        ctx.prompts(attack.target_class, n=256, seed=int(cfg.seed))
    trigger, _ = next(iter(attack.test_triggers().values()))
    has_test = bool(test_shards(cfg))
    before = evaluate_model(cfg, bundle, attack, "cpu") if has_test else {}
    t0 = time.time()
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    torch.manual_seed(derive_seed(cfg.seed, "encoder_attack/torch"))
    hist = method.run(bundle, trigger, shadow, captions, reference, g)
    seconds = round(time.time() - t0, 2)
    after = evaluate_model(cfg, bundle, attack, "cpu") if has_test else {}
    ckpt = factory.save_checkpoint(out / f"{method.method}.pt", bundle, encoder_attack=method.method)
    manifest = {
        "produced_by": "clipbd.attacks.encoder", "git": git_revision(), "method": method.method,
        "params": OmegaConf.to_container(cfg.encoder_attack, resolve=True),
        "base_checkpoint": str(base), "checkpoint": str(ckpt.relative_to(run_dir)),
        "target_class": attack.target_class, "target_captions": list(captions)[:16],
        "trigger": {**_trigger_record(attack, shadow[0], out),
                    "attack": OmegaConf.to_container(cfg.attack, resolve=True), "plan": "poison_plan.json"},
        "num_shadow": len(shadow), "num_reference": 0 if reference is None else len(reference),
        "loss_first": hist[0], "loss_last": hist[-1], "seconds": seconds,
        "metrics_before": before, "metrics_after": after,
    }
    write_json(out / "manifest.json", manifest)
    log.info("encoder attack %s: loss %.4f -> %.4f in %.1f s; %s", method.method, hist[0], hist[-1], seconds,
             "  ".join(f"{k} {before.get(k, float('nan')):.3f}->{v:.3f}" for k, v in after.items()))
    return {"checkpoint": ckpt, "manifest": out / "manifest.json"}


def _old_command_line(args: list[str]) -> list[str]:
    """`python -m clipbd.attacks.encoder ARGS` (before the encoder attack was a stage) as the
    arguments of `python -m clipbd.run`: an explicit `stages=[...]` gains `encoder_attack`."""
    out = []
    for a in args:
        key, eq, val = a.partition("=")
        if eq and key.lstrip("+") == "stages" and "encoder_attack" not in val:
            items = [v for v in val.strip("[] ").split(",") if v.strip()]
            a = f"{key}=[{','.join(items + ['encoder_attack'])}]"
        out.append(a)
    return out


if __name__ == "__main__":  # the old entry point: the same command line, run by the one CLI
    import os
    import sys

    argv = [sys.executable, "-m", "clipbd.run", *_old_command_line(sys.argv[1:])]
    os.execv(sys.executable, argv)
