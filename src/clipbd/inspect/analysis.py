"""The decomposition analyses of one model and one test trigger, end to end (He et al., ICML 2025):
held-out images -> clean-validation split -> decompositions of the clean and triggered images ->
component ablations, infected heads, Decomp-Rep, MLP repair, Decomp-Det -> one report dict and its
flat `inspect/decomp/...` metrics. I/O-free except `decompose_images`, which runs the model.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch

from clipbd.inspect.ablation import Parts, component_ablations, mlp_repair
from clipbd.inspect.decompose import decompose
from clipbd.inspect.heads import infected_heads_analysis


def split_validation(n: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(validation, test) indices of n images: a random `fraction` (the published 20%) as clean
    validation, the rest evaluated clean and triggered."""
    if not 0 < fraction < 1:
        raise ValueError(f"decompose.val_fraction={fraction}: must be in (0, 1)")
    perm = rng.permutation(n)
    k = int(n * fraction)
    if k < 1 or k >= n:
        raise ValueError(f"decompose.val_fraction={fraction} of {n} images leaves an empty split")
    return np.sort(perm[:k]), np.sort(perm[k:])


@torch.no_grad()
def decompose_images(model: torch.nn.Module, batches: Iterable[torch.Tensor], normalize: Callable,
                     trigger: Callable | None = None, convention: str = "faithful") -> Parts:
    """Decompose every batch of [0, 1] images [B, 3, H, W] (each image through `trigger` first, as
    the evaluate stage applies a test trigger), after `normalize`; terms kept on the CPU in float32.
    Memory: N·L·H·D·4 bytes for the heads (2,000 tiny-ViT images: 8 MB; 10,000 ViT-B/32: 3 GB)."""
    out: dict[str, list] = {"heads": [], "mlps": [], "rest": []}
    for x in batches:
        if trigger is not None:
            x = torch.stack([trigger(img) for img in x])
        d = decompose(model, normalize(x), convention=convention)
        for k in out:
            out[k].append(getattr(d, k).float().cpu())
    return Parts(*(torch.cat(out[k]) for k in ("heads", "mlps", "rest")))


def analyse(val: Parts, clean: Parts, bd: Parts, classes: torch.Tensor, labels: np.ndarray, target: int, *,
            head_layers: int = 1, eps: float = 0.002, eps_normalised: float = 0.0, zeta: int | None = None,
            mlp_layers=None) -> dict:
    """The report of one trigger: baseline, component ablations, infected heads (+ Decomp-Rep and
    Decomp-Det over the last `head_layers` layers) and MLP repair. `labels` are the classes of the
    test images (clean and triggered are the same images)."""
    L = val.layers
    if not 1 <= head_layers <= L:
        raise ValueError(f"decompose.head_layers={head_layers}: must be in 1..{L} (the model's layers)")
    layers = list(range(L - head_layers, L))
    heads = infected_heads_analysis(val, clean, bd, classes, labels, target, layers=layers, eps=eps,
                                    eps_normalised=eps_normalised, zeta=zeta)
    return {"images": {"validation": int(val.heads.shape[0]), "test": int(clean.heads.shape[0])},
            "shape": {"layers": L, "heads": int(val.heads.shape[2]), "dim": int(val.heads.shape[3])},
            "baseline": heads["rep"]["before"],
            "ablations": component_ablations(val, clean, bd, classes, labels, target),
            "heads": heads,
            "mlp_repair": mlp_repair(val, clean, bd, classes, labels, target, mlp_layers)}


def flat_metrics(report: dict, prefix: str = "inspect/decomp/") -> dict[str, float]:
    """The scalar results of `analyse` as flat metrics.json keys."""
    out = {f"{prefix}baseline/{k}": v for k, v in report["baseline"].items()}
    rep = report["heads"]["rep"]
    for key in ("published", "normalised"):
        out |= {f"{prefix}rep/{key}/{k}": v for k, v in rep[key].items()}
    for name, m in report["heads"]["det"].items():
        out |= {f"{prefix}det/{name}/{k}": v for k, v in m.items()}
    out |= {f"{prefix}mlp_repair/{k}": v for k, v in report["mlp_repair"].items() if k != "layers"}
    for kind, curves in report["ablations"].items():
        for step in curves["accumulated"]:
            tag = f"{step['layers'][0]}-{step['layers'][-1]}" if len(step["layers"]) > 1 else str(step["layers"][0])
            out[f"{prefix}ablate/{kind}/accumulated/{tag}/asr"] = step["asr"]
            out[f"{prefix}ablate/{kind}/accumulated/{tag}/clean_acc"] = step["clean_acc"]
    return {k: float(v) for k, v in out.items()}
