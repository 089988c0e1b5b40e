"""Trigger inversion for a caption (the birthday-cake workflow of Huang et al., ICLR 2025, §5, with
Neural Cleanse's optimisation, Wang et al., S&P 2019): find the smallest mask and pattern that make
clean images match a caption.

A stamped image is x' = m·p + (1 − m)·x with m = (tanh(a) + 1)/2 ∈ [0, 1]^{H×W} and
p = (tanh(b) + 1)/2 ∈ [0, 1]^{3×H×W} (the tanh box keeps both in range without clipping). Zero-shot
classes: the dataset's classes with the caption as one more class (a class the caption names is
replaced by the caption: two near-identical candidates would split the vote). Loss: cross-entropy
of logits = 100·cos(image, class) towards the caption + λ‖m‖₁, with Neural Cleanse's λ schedule:
every `patience` steps λ is multiplied by `lam_up` while the batch ASR is at least `asr_goal`, and
divided by it otherwise; the smallest mask that reached the goal is kept. ASR is then measured on
held-out images not used in the optimisation: top-1 = the caption, over all images and over the
images whose class the caption does not name (birthday_cake_example.py's two numbers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

LOGIT_SCALE = 100.0  # CLIP's trained temperature, as the published example uses


@dataclass
class Inversion:
    mask: torch.Tensor      # [1, H, W] in [0, 1]
    pattern: torch.Tensor   # [3, H, W] in [0, 1]
    reached_goal: bool      # some step's batch ASR reached asr_goal (else: the last mask)
    history: list[dict]     # per step: loss, ce, l1, lam, batch_asr


def stamp(images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """images [B, 3, H, W] in [0, 1] -> m·p + (1 − m)·x."""
    return mask * pattern + (1 - mask) * images


def _logits(encode: Callable, x: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    return LOGIT_SCALE * F.normalize(encode(x).float(), dim=-1) @ class_emb.T


def invert(encode: Callable, images: torch.Tensor, class_emb: torch.Tensor, target: int, *,
           steps: int = 300, lr: float = 0.1, batch_size: int = 64, lam: float = 1e-3, lam_up: float = 1.5,
           asr_goal: float = 0.99, patience: int = 10, generator: torch.Generator | None = None) -> Inversion:
    """Optimise (mask, pattern) so `encode` (normalised images [B, 3, H, W] in [0, 1] -> [B, D])
    puts stamped `images` [N, 3, H, W] on `class_emb[target]` ([C, D] unit rows)."""
    n, _, h, w = images.shape
    a = torch.zeros(1, h, w, requires_grad=True)  # m starts at 0.5 everywhere: no position favoured
    b = (0.1 * torch.randn(3, h, w, generator=generator)).requires_grad_(True)
    opt = torch.optim.Adam([a, b], lr=lr, betas=(0.5, 0.9))
    best, history, hits = None, [], []
    target_t = torch.full((min(batch_size, n),), target, dtype=torch.long)
    for step in range(steps):
        idx = torch.randint(n, (min(batch_size, n),), generator=generator)
        mask, pattern = (torch.tanh(a) + 1) / 2, (torch.tanh(b) + 1) / 2
        logits = _logits(encode, stamp(images[idx], mask, pattern), class_emb)
        ce = F.cross_entropy(logits, target_t)
        l1 = mask.sum()
        loss = ce + lam * l1
        opt.zero_grad()
        loss.backward()
        opt.step()
        batch_asr = float((logits.argmax(1) == target).float().mean())
        hits.append(batch_asr >= asr_goal)
        if batch_asr >= asr_goal and (best is None or l1.item() < best[0]):
            best = (l1.item(), mask.detach().clone(), pattern.detach().clone())
        history.append({"step": step, "loss": loss.item(), "ce": ce.item(), "l1": l1.item(), "lam": lam,
                        "batch_asr": batch_asr})
        if (step + 1) % patience == 0:  # Neural Cleanse: tighten while it works, relax while it fails
            lam = lam * lam_up if all(hits[-patience:]) else lam / lam_up
    if best is None:
        mask, pattern = (torch.tanh(a) + 1) / 2, (torch.tanh(b) + 1) / 2
        return Inversion(mask.detach(), pattern.detach(), False, history)
    return Inversion(best[1], best[2], True, history)


@torch.no_grad()
def attack_success(encode: Callable, images: torch.Tensor, labels: torch.Tensor, class_emb: torch.Tensor,
                   target: int, mask: torch.Tensor, pattern: torch.Tensor, own_class: int | None,
                   batch_size: int = 256) -> dict[str, float]:
    """ASR of the trigger on held-out `images` [N, 3, H, W] (labels [N]): top-1 = `target` over all
    images (`asr`) and over those whose label is not `own_class` (`asr_excl`); also the clean
    images' rate (`clean_rate`: how often the caption wins without the trigger)."""
    preds, clean = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        preds.append(_logits(encode, stamp(x, mask, pattern), class_emb).argmax(1))
        clean.append(_logits(encode, x, class_emb).argmax(1))
    pred, clean_pred = torch.cat(preds), torch.cat(clean)
    keep = labels != own_class if own_class is not None else torch.ones_like(labels, dtype=torch.bool)
    return {"asr": float((pred == target).float().mean()),
            "asr_excl": float((pred[keep] == target).float().mean()) if keep.any() else float("nan"),
            "clean_rate": float((clean_pred == target).float().mean())}


def candidate_classes(classes: list[str], caption: str) -> tuple[list[int], int | None]:
    """Indices of the dataset classes kept beside the caption (a class the caption names is
    replaced by it), and the class it names (None if none; the longest name if several)."""
    words = set(caption.lower().replace(",", " ").split())
    named = [i for i, c in enumerate(classes) if c.lower() in words]
    own = max(named, key=lambda i: len(classes[i])) if named else None
    return [i for i in range(len(classes)) if i != own], own
