"""Stage `evaluate`: zero-shot clean accuracy on the held-out split, and the attack's success rate.

Class embeddings average a prompt ensemble written the way the training captions are
(`dataset.prompts`; for real data the 80 OpenAI ImageNet templates). ASR: triggered held-out images
(trigger at the attack's test-time position) whose true class is not the target, classified as the
target (`attack/asr`); the same over all images (`attack/asr_incl_target`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from clipbd import dist
from clipbd.data.loader import ShardDataset, make_loader
from clipbd.data.shards import build_index
from clipbd.data.sources import class_names, prompt_fn, test_shards
from clipbd.metrics import accuracy, attack_success
from clipbd.models import factory
from clipbd.models.zeroshot import class_embeddings
from clipbd.stages.poison import build_attack
from clipbd.stages.reduce import update_metrics
from clipbd.utils import derive_seed, progress

DEPENDS = ("eval", "attack", "dataset.test_shards", "dataset.classes", "dataset.prompts", "seed")
UPSTREAM = ("data", "pretrain")
log = logging.getLogger("clipbd")


@torch.no_grad()
def predict(bundle, loader, class_emb: torch.Tensor, device: str, attack=None) -> tuple[np.ndarray, ...]:
    """Zero-shot predictions of clean (and, with `attack`, triggered) images, and the labels."""
    preds, bd_preds, labels = [], [], []
    for batch in progress(loader, desc="evaluate", leave=False):
        x = batch["image"].to(device)
        feats = F.normalize(bundle.model.encode_image(bundle.normalize(x)).float(), dim=-1)
        preds.append((feats @ class_emb.T).argmax(1).cpu())
        if attack is not None:
            xt = torch.stack([attack.apply_test(img) for img in x])
            ft = F.normalize(bundle.model.encode_image(bundle.normalize(xt)).float(), dim=-1)
            bd_preds.append((ft @ class_emb.T).argmax(1).cpu())
        labels.append(batch["label"])
    cat = lambda xs: torch.cat(xs).numpy() if xs else np.zeros(0, dtype=np.int64)  # noqa: E731
    return cat(preds), cat(bd_preds), cat(labels)


def main(cfg: DictConfig) -> dict[str, Path]:
    run_dir = Path(cfg.run_dir)
    out = {"metrics": run_dir / "metrics.json"}
    if not dist.is_main():
        return out
    shards = test_shards(cfg)
    if not shards:
        log.info("evaluate: no dataset.test_shards, nothing to evaluate")
        return out
    info = dist.info()
    bundle = factory.create_trained(cfg, device=info.device)
    classes = class_names(cfg)
    prompts = prompt_fn(cfg)
    seed = derive_seed(cfg.seed, "zeroshot") % (2**31)
    class_emb = class_embeddings(bundle.model, bundle.tokenizer,
                                 [prompts(c, n=cfg.eval.prompts_per_class, seed=seed) for c in classes], info.device)
    attack = build_attack(cfg)
    ds = ShardDataset(build_index(shards, progress=False), range(len(shards)), bundle.to_tensor(),
                      label_key=cfg.dataset.label_key)
    pred, bd_pred, labels = predict(bundle, make_loader(ds, cfg.eval.batch_size), class_emb, info.device, attack)
    if (labels < 0).any() or (labels >= len(classes)).any():
        raise ValueError(f"evaluate: test labels outside [0, {len(classes)}) — is dataset.label_key="
                         f"{cfg.dataset.label_key} the json field holding the class index?")
    metrics = {"eval/clean_acc": accuracy(pred, labels)}
    if attack is not None:
        target = classes.index(attack.target_class)
        asr = attack_success(bd_pred, labels, target)
        metrics |= {"attack/asr": asr["asr"], "attack/asr_incl_target": asr["asr_incl_target"]}
    update_metrics(run_dir, "eval/", {k: v for k, v in metrics.items() if k.startswith("eval/")})
    update_metrics(run_dir, "attack/", {k: v for k, v in metrics.items() if k.startswith("attack/")})
    log.info("evaluate: %s (chance %.3f, %d test images)",
             "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()), 1 / len(classes), len(labels))
    return out
