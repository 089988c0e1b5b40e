"""Detection and attack metrics (pure functions of arrays)."""

from __future__ import annotations

import numpy as np


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in shape")
    if not np.isfinite(scores).all():
        raise ValueError(f"{(~np.isfinite(scores)).sum()} non-finite scores")
    if labels.all() or not labels.any():
        raise ValueError("AUROC needs both poisoned and clean samples")
    return labels, scores


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; higher score = more suspicious; 1 = perfect, 0.5 = chance."""
    from sklearn.metrics import roc_auc_score  # imported on use: ~1 s of every command's start-up

    return float(roc_auc_score(*_check(labels, scores)))


def auprc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (area under precision–recall); chance = the poison rate."""
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(*_check(labels, scores)))


def fpr_at_tpr(labels: np.ndarray, scores: np.ndarray, tpr: float = 0.95) -> float:
    """False-positive rate at the first threshold whose true-positive rate reaches `tpr`."""
    from sklearn.metrics import roc_curve

    fpr, tprs, _ = roc_curve(*_check(labels, scores))
    return float(fpr[np.searchsorted(tprs, tpr, side="left")])


def detection_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    return {"auroc": auroc(labels, scores), "auprc": auprc(labels, scores), "fpr95": fpr_at_tpr(labels, scores)}


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(pred) == np.asarray(labels)).mean())


def attack_success(pred: np.ndarray, labels: np.ndarray, target: int) -> dict[str, float]:
    """Predictions of triggered images -> `asr`: share of the images whose true class is not the
    target that are classified as the target; `asr_incl_target`: the same over all images;
    `bd_acc`: share of the non-target images still classified as their true class."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    hit = pred == target
    non_target = labels != target
    if not non_target.any():
        raise ValueError("ASR needs test images whose class is not the target")
    return {"asr": float(hit[non_target].mean()), "asr_incl_target": float(hit.mean()),
            "bd_acc": float((pred == labels)[non_target].mean())}
