"""Metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from clipbd.metrics import accuracy, attack_success, auprc, auroc, detection_metrics, fpr_at_tpr


def test_auroc_perfect_reversed_and_ties():
    y = np.array([0, 0, 1, 1])
    assert auroc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auroc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert auroc(y, np.ones(4)) == 0.5


def test_auroc_counts_pairs():
    y = np.array([1, 0, 1, 0, 0])
    s = np.array([0.9, 0.8, 0.3, 0.5, 0.1])
    # positive 0.9 beats all 3 negatives; 0.3 beats only 0.1 -> 4 of 6 pairs
    assert auroc(y, s) == pytest.approx(4 / 6)


def test_fpr95_and_auprc():
    y = np.array([1] * 20 + [0] * 80)
    s = np.concatenate([np.linspace(1, 2, 20), np.linspace(0, 1.5, 80)])
    # reaching 19/20 positives needs threshold ~1.05: negatives above it are those > 1.05
    expected = (np.linspace(0, 1.5, 80) >= np.linspace(1, 2, 20)[1]).mean()
    assert fpr_at_tpr(y, s, 0.95) == pytest.approx(expected)
    assert 0.2 < auprc(y, s) <= 1.0
    assert set(detection_metrics(y, s)) == {"auroc", "auprc", "fpr95"}


def test_metrics_refuse_degenerate_input():
    with pytest.raises(ValueError, match="both"):
        auroc(np.ones(3), np.arange(3.0))
    with pytest.raises(ValueError, match="non-finite"):
        auroc(np.array([0, 1]), np.array([0.0, np.nan]))


def test_accuracy_and_asr():
    labels = np.array([0, 1, 2, 3, 3])
    assert accuracy(np.array([0, 1, 0, 3, 3]), labels) == 0.8
    r = attack_success(np.array([3, 3, 1, 3, 0]), labels, target=3)
    assert r["asr"] == pytest.approx(2 / 3) and r["asr_incl_target"] == pytest.approx(3 / 5)
