"""Trigger functions: pure maps of images [..., 3, H, W] in [0, 1] to images of the same shape in
[0, 1]. Every randomness comes in as an argument (a pattern, a control grid, a seed); nothing here
reads files or global state. The attack classes (clipbd.attacks.*) decide which trigger a sample
gets; these functions only draw it.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------- patches
def paste(img: torch.Tensor, patch: torch.Tensor, position: Sequence[float]) -> torch.Tensor:
    """img [..., 3, H, W]; patch [3|1, p, p] or [p, p]; position = fractions (x, y) of the free
    range [0, side − p] ((1, 1) = bottom-right corner) -> copy with the patch pasted."""
    h, w = img.shape[-2:]
    ph, pw = patch.shape[-2:]
    if ph > h or pw > w:
        raise ValueError(f"attack.patch_size={ph}: larger than the {h}×{w} image")
    x = int(round(float(position[0]) * (w - pw)))
    y = int(round(float(position[1]) * (h - ph)))
    out = img.clone()
    out[..., y:y + ph, x:x + pw] = patch.to(img.device, img.dtype)
    return out


def checkerboard(size: int, grid: int) -> torch.Tensor:
    """[size, size] black/white checkerboard of 0/1 with `grid` cells per side (BadNets' patch)."""
    if size < 1 or grid < 1 or size % grid:
        raise ValueError(f"attack.patch_size={size}, attack.grid={grid}: need patch_size ≥ 1 and a "
                         f"multiple of grid")
    cell = size // grid
    ij = torch.arange(grid)
    board = ((ij[:, None] + ij[None, :]) % 2).float()
    return board.repeat_interleave(cell, 0).repeat_interleave(cell, 1)


# ---------------------------------------------------------------------------------------- Blend
def resize_to(pattern: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """pattern [3, h0, w0] -> [3, h, w] (bilinear; identity when the size already matches)."""
    if tuple(pattern.shape[-2:]) == (h, w):
        return pattern
    return F.interpolate(pattern[None], size=(h, w), mode="bilinear", align_corners=False)[0].clamp(0, 1)


def blend(img: torch.Tensor, pattern: torch.Tensor, alpha: float) -> torch.Tensor:
    """Chen et al. (2017) blended injection: (1 − α)·x + α·pattern; pattern [3, h, w] is resized."""
    pattern = resize_to(pattern.to(img.device, img.dtype), *img.shape[-2:])
    return ((1 - alpha) * img + alpha * pattern).clamp(0, 1)


def noise_pattern(seed: int, size: int) -> torch.Tensor:
    """Blend's generated default trigger: [3, size, size] uniform noise from `seed` (Chen et al.
    2017 also blend a random-noise pattern)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.rand(3, size, size, generator=g)


# ---------------------------------------------------------------------------------------- SIG
def sig_signal(h: int, w: int, delta: float, freq: float) -> torch.Tensor:
    """Barni et al. (2019) horizontal sinusoid v(i, j) = Δ·sin(2π·j·f / m) -> [1, h, w]; m = width,
    so `freq` counts periods across the image whatever its resolution."""
    j = torch.arange(w, dtype=torch.float32)
    row = delta * torch.sin(2 * math.pi * j * freq / w)
    return row.expand(h, w)[None]


def sig(img: torch.Tensor, delta: float, freq: float) -> torch.Tensor:
    """x + v, clipped to [0, 1] (same signal on every channel, as the paper)."""
    v = sig_signal(*img.shape[-2:], delta, freq).to(img.device, img.dtype)
    return (img + v).clamp(0, 1)


# ---------------------------------------------------------------------------------------- WaNet
def wanet_control_grid(k: int, generator: torch.Generator) -> torch.Tensor:
    """Nguyen & Tran (2021, §3.2): a k×k field of random 2-D offsets in [−1, 1], normalised by its
    mean absolute value -> [2, k, k]."""
    ins = torch.rand(2, k, k, generator=generator) * 2 - 1
    return ins / ins.abs().mean()


def wanet_grid(control: torch.Tensor, h: int, w: int, s: float,
               noise: torch.Tensor | None = None) -> torch.Tensor:
    """The warping grid for grid_sample -> [1, h, w, 2] (x, y in [−1, 1]).

    control [2, k, k] is upsampled bicubically to the image (a smooth field: neighbouring pixels
    move together), scaled by s/side so s is a displacement in (half-)pixels independent of the
    resolution, added to the identity grid and clipped (paper eq. 5–6). `noise` [h, w, 2] in
    [−1, 1] is the noise mode's extra random per-pixel offset of up to one pixel (paper §3.3)."""
    field = F.interpolate(control[None].float(), size=(h, w), mode="bicubic", align_corners=True)
    field = field.permute(0, 2, 3, 1)  # [1, h, w, 2]
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    identity = torch.stack([xs, ys], -1)[None]  # grid_sample's (x, y) order
    size = torch.tensor([w, h], dtype=torch.float32)
    grid = (identity + s * field / size).clamp(-1, 1)
    if noise is not None:
        grid = (grid + noise[None] / size).clamp(-1, 1)
    return grid


def warp(img: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Resample img [3, H, W] or [B, 3, H, W] through grid [1, H, W, 2]."""
    x = img[None] if img.dim() == 3 else img
    out = F.grid_sample(x, grid.to(x.device, x.dtype).expand(x.shape[0], -1, -1, -1),
                        mode="bilinear", padding_mode="border", align_corners=True)
    return (out[0] if img.dim() == 3 else out).clamp(0, 1)


# ---------------------------------------------------------------------------------------- Nashville
# The Nashville filter as CSSgram defines it (Una Kravets, cssgram/source/scss/nashville.scss),
# which is also what the `pilgram` package implements:
#   ::before  background rgba(247, 176, 153, .56)  mix-blend-mode: darken
#   ::after   background rgba(0, 70, 150, .4)      mix-blend-mode: lighten
#   filter    sepia(.2) contrast(1.2) brightness(1.05) saturate(1.2)
# The CSS filter functions are the matrices/ramps of the W3C Filter Effects spec (§ "sepia",
# "contrast", "brightness", "saturate"); each step is clipped to [0, 1] as an 8-bit canvas would.
NASHVILLE_DARKEN = ((247, 176, 153), 0.56)
NASHVILLE_LIGHTEN = ((0, 70, 150), 0.40)


def _channels(img: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Apply a 3×3 colour matrix to the channel axis of [..., 3, H, W]."""
    return torch.einsum("ij,...jhw->...ihw", m.to(img.device, img.dtype), img).clamp(0, 1)


def css_sepia(img: torch.Tensor, amount: float) -> torch.Tensor:
    a = 1 - amount
    m = torch.tensor([[0.393 + 0.607 * a, 0.769 - 0.769 * a, 0.189 - 0.189 * a],
                      [0.349 - 0.349 * a, 0.686 + 0.314 * a, 0.168 - 0.168 * a],
                      [0.272 - 0.272 * a, 0.534 - 0.534 * a, 0.131 + 0.869 * a]])
    return _channels(img, m)


def css_saturate(img: torch.Tensor, s: float) -> torch.Tensor:
    m = torch.tensor([[0.213 + 0.787 * s, 0.715 - 0.715 * s, 0.072 - 0.072 * s],
                      [0.213 - 0.213 * s, 0.715 + 0.285 * s, 0.072 - 0.072 * s],
                      [0.213 - 0.213 * s, 0.715 - 0.715 * s, 0.072 + 0.928 * s]])
    return _channels(img, m)


def css_blend(img: torch.Tensor, rgb: Sequence[int], opacity: float, mode: str) -> torch.Tensor:
    """Composite a flat colour layer of `opacity` with mix-blend-mode darken (min) or lighten (max)."""
    c = torch.tensor(rgb, dtype=img.dtype, device=img.device).view(3, 1, 1) / 255
    mixed = torch.minimum(img, c) if mode == "darken" else torch.maximum(img, c)
    return (1 - opacity) * img + opacity * mixed


def nashville(img: torch.Tensor) -> torch.Tensor:
    """The Nashville Instagram filter (CSSgram's definition above) on [..., 3, H, W] in [0, 1]."""
    x = css_blend(img, *NASHVILLE_DARKEN, "darken")
    x = css_blend(x, *NASHVILLE_LIGHTEN, "lighten")
    x = css_sepia(x, 0.2)
    x = ((x - 0.5) * 1.2 + 0.5).clamp(0, 1)  # contrast(1.2)
    x = (x * 1.05).clamp(0, 1)  # brightness(1.05)
    return css_saturate(x, 1.2)
