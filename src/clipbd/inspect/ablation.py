"""Component ablations on a decomposition (He et al., ICML 2025, §4: where does the backdoor live?).

A component's term is replaced by its mean over clean validation images and the image is classified
from the re-summed embedding; if ASR collapses while clean accuracy holds, the trigger's direct
effect runs through that component. All functions are pure: `Parts` holds decomposition terms of a
set of images (CPU float tensors), `classes` the unit-norm class embeddings [C, D].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from clipbd.metrics import accuracy, attack_success

KINDS = ("attn", "mlp", "layer")  # a layer's attention term, its MLP term, or both


@dataclass
class Parts:
    """Decomposition terms of N images: heads [N, L, H, D], mlps [N, L, D], rest [N, D]."""

    heads: torch.Tensor
    mlps: torch.Tensor
    rest: torch.Tensor

    def total(self) -> torch.Tensor:
        return self.heads.sum((1, 2)) + self.mlps.sum(1) + self.rest

    def component(self, kind: str) -> torch.Tensor:
        """[N, L, D]: each layer's attention term (its heads summed), MLP term, or both."""
        attn = self.heads.sum(2)
        return {"attn": attn, "mlp": self.mlps, "layer": attn + self.mlps}[kind]

    def take(self, idx) -> "Parts":
        return Parts(self.heads[idx], self.mlps[idx], self.rest[idx])

    @property
    def layers(self) -> int:
        return self.heads.shape[1]


def classify(emb: torch.Tensor, classes: torch.Tensor) -> np.ndarray:
    """Zero-shot predictions [N] (argmax of the dot product: invariant to each row's scale, so the
    re-summed embedding need not be renormalised)."""
    return (emb.float() @ classes.float().T).argmax(1).numpy()


def outcome(clean_emb: torch.Tensor, bd_emb: torch.Tensor, classes: torch.Tensor, labels: np.ndarray,
            target: int) -> dict[str, float]:
    """clean_acc of the clean embeddings; asr, asr_incl_target, bd_acc of the triggered ones."""
    return {"clean_acc": accuracy(classify(clean_emb, classes), labels),
            **attack_success(classify(bd_emb, classes), labels, target)}


def mean_ablate(parts: Parts, kind: str, layers, val_mean: torch.Tensor) -> torch.Tensor:
    """The embedding [N, D] with `kind`'s term at `layers` replaced by its clean mean val_mean [L, D]."""
    comp, layers = parts.component(kind), list(layers)
    return parts.total() - comp[:, layers].sum(1) + val_mean[layers].sum(0)


def component_ablations(val: Parts, clean: Parts, bd: Parts, classes: torch.Tensor, labels: np.ndarray,
                        target: int) -> dict[str, dict[str, list[dict]]]:
    """{kind: {"single": [...], "accumulated": [...]}}: one step per layer, each step
    {"layers", "clean_acc", "asr", "asr_incl_target", "bd_acc"}. single: layer l alone;
    accumulated: layers l..L-1 together, from the last layer down (l = L-1, ..., 0)."""
    L = val.layers
    out: dict[str, dict[str, list[dict]]] = {}
    for kind in KINDS:
        mean = val.component(kind).mean(0)  # [L, D]
        steps = {"single": [[l] for l in range(L)], "accumulated": [list(range(l, L)) for l in range(L - 1, -1, -1)]}
        out[kind] = {name: [{"layers": s, **outcome(mean_ablate(clean, kind, s, mean), mean_ablate(bd, kind, s, mean),
                                                     classes, labels, target)} for s in sets]
                     for name, sets in steps.items()}
    return out


def default_mlp_layers(num_layers: int) -> list[int]:
    """The late MLPs the published code mean-ablates for global triggers: indices 8-12 of the 13
    (ln_pre + 12 MLPs) terms of ViT-B, i.e. the last 5/12 of the layers; here round(5/12 · L) >= 1."""
    k = max(1, round(num_layers * 5 / 12))
    return list(range(num_layers - k, num_layers))


def mlp_repair(val: Parts, clean: Parts, bd: Parts, classes: torch.Tensor, labels: np.ndarray, target: int,
               layers=None) -> dict:
    """Mean-ablate the MLPs at `layers` (default: default_mlp_layers) for every image."""
    layers = default_mlp_layers(val.layers) if layers is None else [int(x) for x in layers]
    bad = [x for x in layers if not 0 <= x < val.layers]
    if bad:
        raise ValueError(f"decompose.mlp_layers={layers}: layers {bad} outside 0..{val.layers - 1}")
    mean = val.mlps.mean(0)
    return {"layers": layers, **outcome(mean_ablate(clean, "mlp", layers, mean), mean_ablate(bd, "mlp", layers, mean),
                                        classes, labels, target)}
