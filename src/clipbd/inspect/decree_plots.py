"""DECREE's figures: the optimisation curve (cosine, PL1, λ per step) and rows of trigger images."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from clipbd.plots import save_figure  # noqa: E402


def curve_plot(path: Path, curve: dict[str, list[float]], pixels: int, threshold: float, best_pl1: float) -> Path:
    """Three panels over optimisation steps: mean off-diagonal cosine (with the success
    threshold), PL1 of the current mask (with the best successful one), and λ (log scale)."""
    steps = np.arange(len(curve["cos"]))
    fig, axes = plt.subplots(3, 1, figsize=(7, 6.5), sharex=True)
    axes[0].plot(steps, curve["cos"], lw=0.8)
    axes[0].axhline(threshold, color="k", ls=":", lw=1, label=f"success {threshold}")
    axes[0].set(ylabel="mean cos (i≠j)")
    axes[0].legend(fontsize=8, loc="lower right")
    axes[1].plot(steps, np.asarray(curve["l1"]) / pixels, lw=0.8)
    axes[1].axhline(best_pl1, color="tab:red", ls="--", lw=1, label=f"best PL1 {best_pl1:.4f}")
    axes[1].set(ylabel="PL1 of the mask", yscale="log")
    axes[1].legend(fontsize=8, loc="upper right")
    axes[2].plot(steps, curve["lambda"], lw=0.8)
    axes[2].set(ylabel="λ", yscale="log", xlabel="step")
    fig.suptitle("DECREE trigger inversion")
    fig.tight_layout()
    return save_figure(fig, path)


def _hwc(img: torch.Tensor) -> np.ndarray:
    img = img.detach().float().cpu().clamp(0, 1)
    return (img if img.ndim == 2 else img.permute(1, 2, 0)).numpy()


def image_row(path: Path, panels: Sequence[tuple[str, torch.Tensor]], rows: int = 1) -> Path:
    """A grid of images ([H, W] grey or [3, H, W] RGB in [0, 1]) with titles, `rows` rows."""
    cols = -(-len(panels) // rows)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.1 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, img) in zip(axes.flat, panels):
        ax.imshow(_hwc(img), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
