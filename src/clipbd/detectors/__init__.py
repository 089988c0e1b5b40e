"""Sample detectors: pure functions of embeddings (neighbourhood scores) and their nn.Module faces."""

from clipbd.detectors.knn import METHODS as KNN_METHODS
from clipbd.detectors.knn import exact_knn, knn_scores
from clipbd.detectors.module import DAODetector, KDistanceDetector, LIDDetector, SLOFDetector

__all__ = [
    "KNN_METHODS",
    "DAODetector",
    "KDistanceDetector",
    "LIDDetector",
    "SLOFDetector",
    "exact_knn",
    "knn_scores",
]
