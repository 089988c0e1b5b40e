"""Sample detectors: pure functions of embeddings (neighbourhood scores, isolation forest, CLIPScore),
the bank/global reference sets, model-based Cognitive Distillation, ABL loss tracking, and the
paper's nn.Module faces. docs/detectors.md lists them all."""

from clipbd.detectors.clipscore import clip_scores
from clipbd.detectors.iforest import iforest_scores
from clipbd.detectors.knn import METHODS as KNN_METHODS
from clipbd.detectors.knn import exact_knn, knn_scores
from clipbd.detectors.module import DAODetector, KDistanceDetector, LIDDetector, SLOFDetector
from clipbd.detectors.reference import bank_scores, feature_space, global_scores

__all__ = [
    "KNN_METHODS",
    "DAODetector",
    "KDistanceDetector",
    "LIDDetector",
    "SLOFDetector",
    "bank_scores",
    "clip_scores",
    "exact_knn",
    "feature_space",
    "global_scores",
    "iforest_scores",
    "knn_scores",
]
