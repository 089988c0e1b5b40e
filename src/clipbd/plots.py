"""Plots a reader looks at first: ROC curves per detector and clean-vs-poisoned score histograms."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from clipbd.utils import atomic_path  # noqa: E402


def save_figure(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def roc_plot(path: Path, labels: np.ndarray, scores: dict[str, np.ndarray]) -> Path:
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, s in scores.items():
        fpr, tpr, _ = roc_curve(labels, s)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {roc_auc_score(labels, s):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate",
           title=f"ROC: {int(labels.sum())} poisoned of {len(labels)}")
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def histogram_bins(s: np.ndarray, n: int = 60, q: float = 0.5) -> tuple[np.ndarray, bool]:
    """Bin edges for one detector's scores [N], and whether the x axis is logarithmic.

    The range is the central (q, 100 - q) percentiles of the finite scores, so a few extreme values
    (DAO's ratios raised to LID powers reach 1e6 and more) do not squeeze the rest into one bin;
    values outside are drawn in the edge bins. Positive scores spanning more than two decades are
    binned logarithmically."""
    finite = s[np.isfinite(s)]
    if len(finite) == 0:
        return np.linspace(0.0, 1.0, n + 1), False
    lo, hi = np.percentile(finite, [q, 100 - q])
    if hi <= lo:  # (nearly) constant scores
        lo, hi = float(finite.min()), float(finite.max())
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
    if lo > 0 and hi / lo > 100:
        return np.geomspace(lo, hi, n + 1), True
    return np.linspace(lo, hi, n + 1), False


def score_histograms(path: Path, labels: np.ndarray, scores: dict[str, np.ndarray]) -> Path:
    n = len(scores)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3), squeeze=False)
    y = labels.astype(bool)
    for ax, (name, s) in zip(axes[0], scores.items()):
        bins, log_x = histogram_bins(s)
        lo, hi = bins[0], bins[-1]
        clip = lambda v: np.clip(v[np.isfinite(v)], lo, hi)  # noqa: E731 - outliers into the edge bins
        for part, label in ((s[~y], f"clean ({(~y).sum()})"), (s[y], f"poisoned ({y.sum()})")):
            v = clip(part)  # each group's share per bin (bins differ in width on a log axis)
            ax.hist(v, bins=bins, weights=np.full(len(v), 1 / max(1, len(v))), alpha=0.6, label=label)
        if log_x:
            ax.set_xscale("log")
        ax.set(title=name, xlabel="score (higher = more suspicious)" + (", log scale" if log_x else ""))
        ax.text(0.99, 0.97, "0.5-99.5 percentile range", transform=ax.transAxes, ha="right", va="top", fontsize=6)
    axes[0][0].set_ylabel("share of the group")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def save_image_grid(path: Path, images, scale: int = 4, pad: int = 1) -> Path:
    """images [B, 3, H, W] in [0, 1] (a torch tensor or array) -> one PNG row, each image `scale`x
    larger with nearest-neighbour pixels (a trigger is a few pixels: blurring would hide it)."""
    from PIL import Image

    x = np.asarray(images.detach().cpu() if hasattr(images, "detach") else images, dtype=np.float32)
    b, _, h, w = x.shape
    grid = np.ones((h, b * (w + pad) - pad, 3), dtype=np.float32)
    for i in range(b):
        grid[:, i * (w + pad):i * (w + pad) + w] = x[i].transpose(1, 2, 0)
    img = Image.fromarray((np.clip(grid, 0, 1) * 255 + 0.5).astype(np.uint8))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def heads_infected(path: Path, shares: dict[str, list], title: str = "") -> Path:
    """Heatmaps layer × head of the share of images whose head is infected (decompose stage):
    `shares` maps a panel name (e.g. "triggered", "clean") to an [L, H] list."""
    fig, axes = plt.subplots(1, len(shares), figsize=(3.2 * len(shares) + 1, 3.2), squeeze=False)
    for ax, (name, share) in zip(axes[0], shares.items()):
        a = np.asarray(share, dtype=float)
        im = ax.imshow(a, vmin=0, vmax=1, cmap="magma", aspect="auto")
        for (i, j), v in np.ndenumerate(a):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
        ax.set(title=name, xlabel="head", ylabel="layer", xticks=range(a.shape[1]), yticks=range(a.shape[0]))
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="share infected")
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def ablation_curves(path: Path, ablations: dict, title: str = "") -> Path:
    """ASR and clean accuracy when a component is replaced by its clean mean: per layer alone
    (left) and accumulated from the last layer down (right); one colour per component kind."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    colours = {"attn": "C0", "mlp": "C1", "layer": "C2"}
    for ax, mode in zip(axes, ("single", "accumulated")):
        for kind, curves in ablations.items():
            steps = curves[mode]
            ticks = [f"{s['layers'][0]}" if len(s["layers"]) == 1 else f"{s['layers'][0]}-{s['layers'][-1]}"
                     for s in steps]
            x = np.arange(len(steps))
            ax.plot(x, [s["asr"] for s in steps], "-o", color=colours.get(kind), label=f"{kind} ASR")
            ax.plot(x, [s["clean_acc"] for s in steps], "--s", color=colours.get(kind), label=f"{kind} clean acc")
            ax.set_xticks(x, ticks)
        ax.set(xlabel="layers mean-ablated", title=f"{mode}", ylim=(-0.02, 1.02))
    axes[0].set_ylabel("rate")
    axes[1].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
