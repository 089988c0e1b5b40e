"""The CLIP contrastive loss over the global batch (features gathered across ranks by dist.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipbd import dist


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of Radford et al. (2021) on unit-norm features [n_local, D].

    Every rank builds the full [N, N] logits from the gathered features; only its own rows carry
    gradient, and DDP averages gradients over ranks, so the loss is scaled by the world size to make
    the update identical to one process holding the whole global batch."""
    all_img = dist.all_gather_cat(image_features)  # [N, D]
    all_txt = dist.all_gather_cat(text_features)  # [N, D]
    logits = logit_scale * all_img @ all_txt.T  # [N, N]
    labels = torch.arange(logits.shape[0], device=logits.device)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return loss * dist.world()


@torch.no_grad()
def clip_loss_per_sample(image_features: torch.Tensor, text_features: torch.Tensor,
                         logit_scale: torch.Tensor) -> torch.Tensor:
    """Each local pair's own share of `clip_loss` [n_local]: (CE of its image over all captions + CE of
    its caption over all images) / 2 within the global batch; the mean over the global batch is the
    loss. No gradient (recorded for ABL-style loss tracking, clipbd.detectors.abl)."""
    all_img = dist.all_gather_cat(image_features.detach())  # [N, D]
    all_txt = dist.all_gather_cat(text_features.detach())  # [N, D]
    logits = logit_scale.detach() * all_img @ all_txt.T  # [N, N]
    labels = torch.arange(logits.shape[0], device=logits.device)
    per = (F.cross_entropy(logits, labels, reduction="none") + F.cross_entropy(logits.T, labels, reduction="none")) / 2
    n = image_features.shape[0]
    return per[dist.rank() * n:(dist.rank() + 1) * n]
