"""Zero-shot classification heads: one embedding per class, averaged over a prompt ensemble."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def class_embeddings(model: torch.nn.Module, tokenizer: Callable, prompts: Sequence[Sequence[str]],
                     device: str = "cpu", batch_size: int = 512) -> torch.Tensor:
    """prompts[c] is the list of prompts of class c -> [C, D] unit-norm class embeddings
    (mean of the unit-norm prompt embeddings, renormalised, as in CLIP's prompt ensembling)."""
    out = []
    for class_prompts in prompts:
        embs = []
        for i in range(0, len(class_prompts), batch_size):
            tokens = tokenizer(list(class_prompts[i:i + batch_size])).to(device)
            embs.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
        out.append(F.normalize(torch.cat(embs).mean(0), dim=-1))
    return torch.stack(out)


def imagenet_classes() -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def openai_imagenet_prompts(class_name: str, n: int | None = None, seed: int = 0) -> list[str]:
    """The 80 OpenAI ImageNet templates filled with `class_name` (the paper's poison captions and
    zero-shot prompts). `n` and `seed` are accepted for a uniform prompt-source signature."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    prompts = [t(class_name) for t in OPENAI_IMAGENET_TEMPLATES]
    return prompts if n is None else prompts[:n]
