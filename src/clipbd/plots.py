"""Plots a reader looks at first: ROC curves per detector and clean-vs-poisoned score histograms."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from clipbd.utils import atomic_path  # noqa: E402


def _save(fig, path: Path) -> Path:
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
    return _save(fig, path)


def score_histograms(path: Path, labels: np.ndarray, scores: dict[str, np.ndarray]) -> Path:
    n = len(scores)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3), squeeze=False)
    y = labels.astype(bool)
    for ax, (name, s) in zip(axes[0], scores.items()):
        lo, hi = np.percentile(s, [0.1, 99.9])
        lo, hi = min(lo, s[y].min()), max(hi, s[y].max())
        bins = np.linspace(lo, hi, 60)
        ax.hist(np.clip(s[~y], lo, hi), bins=bins, density=True, alpha=0.6, label=f"clean ({(~y).sum()})")
        ax.hist(np.clip(s[y], lo, hi), bins=bins, density=True, alpha=0.6, label=f"poisoned ({y.sum()})")
        ax.set(title=name, xlabel="score (higher = more suspicious)")
    axes[0][0].set_ylabel("density")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
