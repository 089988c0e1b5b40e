"""Infected heads, Decomp-Rep and Decomp-Det (He et al., ICML 2025, §5; `compute_bd_heads.py`).

A head's prototype is its mean term over clean validation images. An image's head is *infected*
when its term no longer points along the prototype:
  published   s = <c_{n,l,h}, mu_{l,h}>, infected if s <= eps (default 0.002, in the units of the
              faithful convention, where the pieces sum to the unit-norm embedding);
  normalised  cos(c_{n,l,h}, mu_{l,h}), infected if <= eps_normalised (default 0): independent of
              the embedding's and the head's scale, so one threshold serves any convention and width.
Decomp-Rep replaces each image's infected heads by their prototypes and classifies the re-summed
embedding; Decomp-Det scores an image by its number of infected heads (more = more suspicious).
The published code looks at the last layer only (`num_last_layer=1`); `layers` picks which.
"""

from __future__ import annotations

import numpy as np
import torch

from clipbd.inspect.ablation import Parts, outcome
from clipbd.metrics import detection_metrics


def prototypes(val: Parts) -> torch.Tensor:
    """[L, H, D]: each head's mean term over the clean validation images."""
    return val.heads.mean(0)


def head_scores(parts: Parts, proto: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dot [N, L, H], cos [N, L, H]) of every image's head terms with their prototypes."""
    dot = torch.einsum("nlhd,lhd->nlh", parts.heads, proto)
    cos = dot / (parts.heads.norm(dim=-1) * proto.norm(dim=-1)).clamp_min(1e-30)
    return dot, cos


def infected(parts: Parts, proto: torch.Tensor, *, eps: float = 0.002, eps_normalised: float = 0.0
             ) -> dict[str, torch.Tensor]:
    """{"published": bool [N, L, H], "normalised": bool [N, L, H], "cos": [N, L, H]} (module docstring)."""
    dot, cos = head_scores(parts, proto)
    return {"published": dot <= eps, "normalised": cos <= eps_normalised, "cos": cos}


def repair(parts: Parts, mask: torch.Tensor, proto: torch.Tensor) -> torch.Tensor:
    """Decomp-Rep: the embedding [N, D] with each image's heads where mask [N, L, H] replaced by
    their prototypes [L, H, D]."""
    m = mask.unsqueeze(-1).to(parts.heads.dtype)
    return parts.total() - (m * (parts.heads - proto)).sum((1, 2))


def default_zeta(num_heads: int) -> int:
    """The published filter's threshold, 5 infected heads of ViT-B's 12 (`detect_threshold=5`),
    scaled to the heads looked at: round(5/12 · heads)."""
    return round(num_heads * 5 / 12)


def detection(inf_bd: dict, inf_clean: dict, layers: list[int], zeta: int | None = None) -> dict:
    """Decomp-Det on triggered (positive) vs clean (negative) images: AUROC/AUPRC/FPR95 of the
    infected-head count over `layers` (published and normalised scores) and of a continuous variant
    that breaks the count's ties by 1 - mean cosine (scaled into [0, 1), so the count still
    dominates); and the filter "more than zeta infected heads" (published count)."""
    def counts(inf, key):
        return inf[key][:, layers].flatten(1).sum(1).numpy().astype(np.float64)

    def continuous(inf):
        return counts(inf, "published") + 0.4999 * (1 - inf["cos"][:, layers].flatten(1).mean(1).numpy())

    y = np.r_[np.ones(inf_bd["cos"].shape[0]), np.zeros(inf_clean["cos"].shape[0])]
    out = {}
    for name, fn in (("count", lambda i: counts(i, "published")), ("count_normalised", lambda i: counts(i, "normalised")),
                     ("continuous", continuous)):
        out[name] = detection_metrics(y, np.r_[fn(inf_bd), fn(inf_clean)])
    heads = len(layers) * inf_bd["cos"].shape[2]
    zeta = default_zeta(heads) if zeta is None else int(zeta)
    out["filter"] = {"zeta": zeta, "heads": heads, "tpr": float((counts(inf_bd, "published") > zeta).mean()),
                     "fpr": float((counts(inf_clean, "published") > zeta).mean())}
    return out


def infected_heads_analysis(val: Parts, clean: Parts, bd: Parts, classes: torch.Tensor, labels: np.ndarray,
                            target: int, *, layers: list[int], eps: float = 0.002, eps_normalised: float = 0.0,
                            zeta: int | None = None) -> dict:
    """Prototypes, infection shares [L, H] (triggered, clean; both scores), Decomp-Rep before/after
    (published and normalised masks, restricted to `layers`) and Decomp-Det (`detection`)."""
    proto = prototypes(val)
    inf_bd = infected(bd, proto, eps=eps, eps_normalised=eps_normalised)
    inf_clean = infected(clean, proto, eps=eps, eps_normalised=eps_normalised)
    only = torch.zeros(val.layers, dtype=torch.bool)
    only[layers] = True
    share = {f"{which}_{key}": inf[key].float().mean(0).tolist()
             for which, inf in (("triggered", inf_bd), ("clean", inf_clean)) for key in ("published", "normalised")}
    rep = {"before": outcome(clean.total(), bd.total(), classes, labels, target)}
    for key in ("published", "normalised"):
        mb, mc = inf_bd[key] & only[None, :, None], inf_clean[key] & only[None, :, None]
        rep[key] = outcome(repair(clean, mc, proto), repair(bd, mb, proto), classes, labels, target)
    return {"layers": layers, "eps": eps, "eps_normalised": eps_normalised, "share": share, "rep": rep,
            "det": detection(inf_bd, inf_clean, layers, zeta)}
