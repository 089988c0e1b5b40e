"""Cognitive Distillation (Huang et al., ICLR 2023, "Distilling Cognitive Backdoor Patterns within an
Image"), applied to the image encoder as in Huang et al., ICLR 2025.

For each image x (pixels in [0, 1]) learn a mask m in [0, 1]^{1 x H x W} (m = (tanh(w) + 1) / 2,
w initialised at 1) that keeps the encoder's output while revealing as little of the image as
possible; the rest is filled with uniform noise, one random colour per image and step:

    x_m = x * m + (1 - m) * delta,   delta ~ U[0, 1]^{C x 1 x 1}
    loss(m) = mean_e |f(x_m) - f(x)| + gamma * ||m||_p + beta * TV(m)           (CD paper, Eq. 2)

with f the image encoder (raw embedding), TV the mean squared difference of neighbouring mask pixels,
minimised with Adam (lr, betas (0.1, 0.1)) for `steps` steps. A backdoored image's embedding is
carried by its small trigger, so its mask ends up small.

Score direction: the published code returns ||m||_1 (lower = more suspicious). clipbd reports
-||m||_1 / (H W), minus the mean mask value in [-1, 0], so that higher = more suspicious as for every
other detector (AUROC is unchanged by the division). Normalisation by the model's mean/std happens
after masking, so the noise and the mask live in pixel space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch


def total_variation(mask: torch.Tensor) -> torch.Tensor:
    """mask [b, c, h, w] -> [b]: sum of squared neighbour differences over c*h*w (the CD paper's TV)."""
    b, c, h, w = mask.shape
    tv_h = (mask[:, :, 1:, :] - mask[:, :, :-1, :]).pow(2).sum((1, 2, 3))
    tv_w = (mask[:, :, :, 1:] - mask[:, :, :, :-1]).pow(2).sum((1, 2, 3))
    return (tv_h + tv_w) / (c * h * w)


def distill_masks(encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, *, steps: int = 100,
                  lr: float = 0.1, p: float = 1.0, gamma: float = 0.01, beta: float = 1.0, mask_channels: int = 1,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Optimised masks [b, mask_channels, h, w] in [0, 1] for images [b, c, h, w] in [0, 1].

    encode: pixels in [0, 1] -> embeddings [b, e] (normalisation inside); its parameters get no
    gradient. generator: the noise colours' random stream (on the images' device).
    """
    b, c, h, w = images.shape
    with torch.no_grad():
        target = encode(images).float()  # [b, e]
    param = torch.ones(b, mask_channels, h, w, device=images.device, requires_grad=True)
    opt = torch.optim.Adam([param], lr=lr, betas=(0.1, 0.1))
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        mask = (torch.tanh(param) + 1) / 2
        noise = torch.rand(b, c, 1, 1, device=images.device, generator=generator)
        out = encode(images * mask + (1 - mask) * noise).float()
        loss = (out - target).abs().mean(1) + gamma * mask.flatten(1).norm(p=p, dim=1) + beta * total_variation(mask)
        loss.sum().backward()  # per-image losses are independent; sum = the published mean x b
        opt.step()
    return ((torch.tanh(param) + 1) / 2).detach()


@dataclass(frozen=True)
class CognitiveDistillation:
    """Config face (conf/detector/cd.yaml): scored on each image during extraction (needs the model).
    Defaults are the published ones (lr 0.1, p 1, gamma 0.01, beta 1, 100 steps, 1 mask channel).
    The published loss averages over the batch with Adam; summing instead makes each image's mask
    independent of its batch (Adam is invariant to that constant factor except for its epsilon)."""

    steps: int = 100
    lr: float = 0.1
    p: float = 1.0
    gamma: float = 0.01
    beta: float = 1.0
    mask_channels: int = 1
    needs: ClassVar[str] = "images"
    higher_is_suspicious: ClassVar[bool] = True  # clipbd.detectors.ranking

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.mask_channels not in (1, 3):
            raise ValueError(f"cognitive distillation: steps={self.steps} must be >= 1, lr={self.lr} > 0, "
                             f"mask_channels={self.mask_channels} 1 or 3")

    def score_images(self, encode: Callable, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """images [b, c, h, w] in [0, 1] -> float64 [b] = -mean mask value (higher = more suspicious)."""
        masks = distill_masks(encode, images, steps=self.steps, lr=self.lr, p=self.p, gamma=self.gamma,
                              beta=self.beta, mask_channels=self.mask_channels, generator=generator)
        return -masks.flatten(1).sum(1).double().cpu() / (images.shape[2] * images.shape[3])
