"""ABL-style loss tracking (Li et al., NeurIPS 2021, "Anti-Backdoor Learning"): backdoor samples are
learned faster than clean ones, so their training loss in the first epochs is lower.

The pretrain stage records, for every epoch, each sample's own contrastive loss (its row of the
symmetric InfoNCE: (CE(image -> captions) + CE(caption -> images)) / 2 over the global batch, at the
step that saw it, before the update) into `<run_dir>/sample_loss/epoch_NNNN.h5` (`loss` [N] float32
by global sample index, NaN where the epoch did not see the sample, e.g. dropped by `drop_last`).

Score = minus the mean recorded loss over the first `epochs` epochs (higher = more suspicious), as
the CD paper's ABL analysis (1 - normalised mean loss of the first epochs; normalising does not
change the ranking). A sample never seen in those epochs gets the median score of the others (neutral),
and the stage logs how many there were.

In CLIP a poisoned pair's caption ("a banana") is shared by every poisoned sample of a batch, whose
captions are then each other's hard negatives; the loss of poisoned rows is not necessarily lower than
that of clean rows, so ABL is a baseline here (Huang et al., ICLR 2025 report it as weak on CLIP).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import h5py
import numpy as np

from clipbd.utils import atomic_path

LOSS_DIR = "sample_loss"
log = logging.getLogger("clipbd")


def loss_path(run_dir: str | Path, epoch: int) -> Path:
    """Per-sample loss file of 1-based `epoch`."""
    return Path(run_dir) / LOSS_DIR / f"epoch_{epoch:04d}.h5"


class LossRecorder:
    """Accumulates one epoch's per-sample losses by global index (every rank its own rows)."""

    def __init__(self, num_samples: int):
        self.total = np.zeros(num_samples, dtype=np.float64)
        self.count = np.zeros(num_samples, dtype=np.int64)

    def add(self, index, loss) -> None:
        """index [b] global sample indices, loss [b] (tensors or arrays) of one step."""
        index = np.asarray(index.cpu() if hasattr(index, "cpu") else index, dtype=np.int64)
        loss = np.asarray(loss.detach().cpu() if hasattr(loss, "detach") else loss, dtype=np.float64)
        np.add.at(self.total, index, loss)
        np.add.at(self.count, index, 1)

    def merge(self, all_reduce_sum, device: str = "cpu") -> None:
        """Sum the ranks' records with `all_reduce_sum` (clipbd.dist's: tensor -> summed tensor, in place)."""
        import torch

        both = torch.from_numpy(np.stack([self.total, self.count.astype(np.float64)])).to(device)
        both = all_reduce_sum(both).cpu().numpy()
        self.total, self.count = both[0], np.rint(both[1]).astype(np.int64)

    def write(self, run_dir: str | Path, epoch: int, stage_key: str) -> Path:
        """Write epoch `epoch` (1-based) atomically: loss = mean per sample, NaN where unseen."""
        path = loss_path(run_dir, epoch)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(self.count > 0, self.total / np.maximum(self.count, 1), np.nan)
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["producer"] = "clipbd.stages.pretrain"
            f.attrs["stage_key"] = stage_key
            f.attrs["epoch"] = epoch
            f["loss"] = mean.astype(np.float32)
            f["count"] = self.count.astype(np.int32)
        return path


def read_losses(run_dir: str | Path, epochs: int) -> np.ndarray:
    """[epochs, N] recorded per-sample losses of the first `epochs` epochs."""
    rows = []
    for e in range(1, epochs + 1):
        path = loss_path(run_dir, e)
        if not path.exists():
            done = len(list((Path(run_dir) / LOSS_DIR).glob("epoch_*.h5")))
            raise FileNotFoundError(
                f"{path} is missing: detector abl (epochs={epochs}) needs the per-sample losses the pretrain "
                f"stage records ({done} epoch(s) found); lower detector.abl.epochs, or pretrain in this run "
                "(abl cannot score a scan of an existing checkpoint)")
        with h5py.File(path, "r") as f:
            rows.append(f["loss"][()])
    return np.stack(rows)


def abl_scores(losses: np.ndarray, index) -> tuple[np.ndarray, int]:
    """losses [E, N], index [n] -> (float64 [n] = -mean loss over E, number of never-seen samples)."""
    sub = np.asarray(losses, dtype=np.float64)[:, np.asarray(index, dtype=np.int64)]
    seen = np.isfinite(sub).any(0)
    out = np.empty(sub.shape[1], dtype=np.float64)
    out[seen] = -np.nanmean(sub[:, seen], axis=0)
    out[~seen] = np.median(out[seen]) if seen.any() else 0.0
    return out, int((~seen).sum())


@dataclass(frozen=True)
class ABL:
    """Config face (conf/detector/abl.yaml): reads the losses the run's pretrain stage recorded."""

    epochs: int = 5  # average the per-sample loss over the first `epochs` epochs of pretraining
    needs: ClassVar[str] = "training"
    higher_is_suspicious: ClassVar[bool] = True  # clipbd.detectors.ranking

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"detector abl epochs={self.epochs}: must be >= 1")

    def score_training(self, run_dir: str | Path, index) -> np.ndarray:
        scores, unseen = abl_scores(read_losses(run_dir, self.epochs), index)
        if unseen:
            log.info("abl: %d of %d samples were not seen in the first %d epoch(s); given the median score",
                     unseen, len(scores), self.epochs)
        return scores
