"""nn.Module face of the neighbourhood detectors, call-compatible with the published code
(Huang et al., ICLR 2025: `DAODetector(k, est_type, gather_distributed, compute_mode)(model, images,
texts)`), built on the pure `knn_scores`.

What a call does:
- features: `model.encode_image(images)`, unnormalised, like the published code (which scores raw
  embeddings); with `texts`, also `model.encode_text(texts)`. Computed under `torch.no_grad()`.
- query: the image embeddings (`features="image"`, the default) or the caption embeddings
  (`features="text"`, the published DAO's `modality="text"`; needs `texts`).
- reference, images only: the batch itself (own row excluded). With texts: the image rows and the
  caption rows together, `cat([images, captions])`, and each query excludes both its own image and its
  own caption, as the published code does (it masks the diagonal of the image and the text block).
  Reference points' own statistics exclude only themselves.
- `gather_distributed=True`: the image (and caption) embeddings of all ranks are gathered with
  `clipbd.dist.all_gather_cat` (equal batch size on every rank) and this rank's rows, at offset
  `rank * batch`, are excluded through `knn_scores(..., self_offset=...)`.
- returns float64 scores [b] on the images' device, higher = more suspicious.
`compute_mode` is accepted for compatibility and ignored: distances are always exact (float32 products
to select candidates, float64 re-ranking; see `clipbd.detectors.knn`). `convention="faithful"`
reproduces the published numbers (as run with exact distances), also for image-text and gathered
batches.
"""

from __future__ import annotations

import torch
from torch import nn

from clipbd.detectors.knn import CONVENTIONS, EST_TYPES, knn_scores

FEATURES = ("image", "text")
_COMPUTE_MODES = (None, "use_mm_for_euclid_dist_if_necessary", "use_mm_for_euclid_dist",
                  "donot_use_mm_for_euclid_dist")


class NeighbourhoodDetector(nn.Module):
    """Base class: one `knn_scores` method applied to a model's embeddings of a batch."""

    method = ""

    def __init__(self, k: int = 16, est_type: str = "mle", gather_distributed: bool = False,
                 compute_mode: str | None = None, convention: str = "textbook",
                 features: str = "image"):
        super().__init__()
        for name, value, allowed in [("est_type", est_type, EST_TYPES),
                                     ("convention", convention, CONVENTIONS),
                                     ("features", features, FEATURES),
                                     ("compute_mode", compute_mode, _COMPUTE_MODES)]:
            if value not in allowed:
                raise ValueError(f"{type(self).__name__}({name}={value!r}): choose one of {list(allowed)}")
        self.k, self.est_type, self.gather_distributed = k, est_type, gather_distributed
        self.compute_mode, self.convention, self.features = compute_mode, convention, features

    def extra_repr(self) -> str:
        return (f"k={self.k}, est_type={self.est_type!r}, convention={self.convention!r}, "
                f"features={self.features!r}, gather_distributed={self.gather_distributed}")

    def forward(self, model, images: torch.Tensor, texts: torch.Tensor | None = None) -> torch.Tensor:
        """images [b, 3, H, W], texts [b, L] token ids or None -> scores [b] (float64)."""
        if self.features == "text" and texts is None:
            raise ValueError(f"{type(self).__name__}(features='text') scores captions: pass texts")
        with torch.no_grad():
            blocks = [model.encode_image(images)]  # [b, e]
            if texts is not None:
                blocks.append(model.encode_text(texts))  # [b, e]
        query = blocks[0] if self.features == "image" else blocks[1]
        reference, self_offset = self._reference(blocks, query.shape[0])
        scores = knn_scores(query, reference, k=self.k, methods=(self.method,),
                            convention=self.convention, self_offset=self_offset, est_type=self.est_type)
        return torch.from_numpy(scores[self.method]).to(images.device)

    def _reference(self, blocks, b):
        """(reference [M, e] or None, offsets of this batch's own rows in it)."""
        offset = 0
        if self.gather_distributed:
            from clipbd import dist  # the only module allowed to talk to torch.distributed

            blocks = [dist.all_gather_cat(x) for x in blocks]  # [world * b, e] each, rank order
            offset = dist.rank() * b
        elif len(blocks) == 1:
            return None, None  # in-batch: knn_scores excludes each row itself
        starts = [sum(x.shape[0] for x in blocks[:i]) for i in range(len(blocks))]
        return torch.cat(blocks), tuple(s + offset for s in starts)


class DAODetector(NeighbourhoodDetector):
    """Dimensionality-aware outlier score (Anderberg et al. 2024); LID estimator chosen by est_type."""

    method = "dao"


class SLOFDetector(NeighbourhoodDetector):
    """Simplified local outlier factor; est_type is accepted and unused."""

    method = "slof"


class KDistanceDetector(NeighbourhoodDetector):
    """Distance to the k-th nearest neighbour; est_type is accepted and unused."""

    method = "kdist"


class LIDDetector(NeighbourhoodDetector):
    """Local intrinsic dimensionality of the query itself: MLE (est_type="mle") or MoM ("mom")."""

    @property
    def method(self) -> str:
        return "lid" if self.est_type == "mle" else "lid_mom"
