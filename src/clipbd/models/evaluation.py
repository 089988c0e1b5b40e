"""Zero-shot evaluation of a CLIP on a run's held-out shards: clean accuracy and, with an attack,
its success rate (used by the `evaluate` stage and by the encoder attacks' before/after numbers).

Class embeddings average a prompt ensemble written the way the training captions are
(`dataset.prompts`; for real data the 80 OpenAI ImageNet templates).

Attack metrics (each test trigger is the attack's `apply_test`, documented per attack in
docs/attacks.md, e.g. the BadNets patch at its fixed test position):
  attack/asr              held-out images whose true class is not the target, triggered, classified
                          as the target;
  attack/asr_incl_target  the same over all held-out images;
  attack/bd_acc           triggered non-target images still classified as their true class.
A multi-trigger attack reports each member as attack/<trigger>/{asr,asr_incl_target,bd_acc} and
their mean as attack/asr, attack/asr_incl_target, attack/bd_acc.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from clipbd.data.loader import ShardDataset, make_loader
from clipbd.data.shards import build_index
from clipbd.data.sources import class_names, prompt_fn, test_shards
from clipbd.errors import ConfigError
from clipbd.metrics import accuracy, attack_success
from clipbd.models.zeroshot import class_embeddings
from clipbd.utils import derive_seed, progress

log = logging.getLogger("clipbd")


@torch.no_grad()
def predict(bundle, loader, class_emb: torch.Tensor, device: str,
            test_triggers: dict | None = None) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Zero-shot predictions of the clean images, of the images under each test trigger
    (name -> (fn, target)), and the labels."""
    test_triggers = test_triggers or {}
    preds, bd_preds, labels = [], {name: [] for name in test_triggers}, []
    classify = lambda x: (F.normalize(bundle.model.encode_image(bundle.normalize(x)).float(), dim=-1)  # noqa: E731
                          @ class_emb.T).argmax(1).cpu()
    for batch in progress(loader, desc="evaluate", leave=False):
        x = batch["image"].to(device)
        preds.append(classify(x))
        for name, (fn, _) in test_triggers.items():
            bd_preds[name].append(classify(torch.stack([fn(img) for img in x])))
        labels.append(batch["label"])
    cat = lambda xs: torch.cat(xs).numpy() if xs else np.zeros(0, dtype=np.int64)  # noqa: E731
    return cat(preds), {k: cat(v) for k, v in bd_preds.items()}, cat(labels)


def attack_metrics(bd_preds: dict[str, np.ndarray], labels: np.ndarray, test_triggers: dict,
                   classes: list[str]) -> dict[str, float]:
    """attack/* metrics (module docstring) from the triggered predictions of each test trigger."""
    per = {name: attack_success(bd_preds[name], labels, classes.index(target))
           for name, (_, target) in test_triggers.items()}
    if len(per) == 1:
        return {f"attack/{k}": v for k, v in next(iter(per.values())).items()}
    out = {f"attack/{name}/{k}": v for name, m in per.items() for k, v in m.items()}
    for k in next(iter(per.values())):
        out[f"attack/{k}"] = float(np.mean([m[k] for m in per.values()]))
    return out


def evaluate_model(cfg: DictConfig, bundle, attack, device: str) -> dict[str, float]:
    """eval/clean_acc and (with `attack`) attack/* of `bundle` on the run's held-out shards."""
    classes = class_names(cfg)
    prompts = prompt_fn(cfg)
    seed = derive_seed(cfg.seed, "zeroshot") % (2**31)
    class_emb = class_embeddings(bundle.model, bundle.tokenizer,
                                 [prompts(c, n=cfg.eval.prompts_per_class, seed=seed) for c in classes], device)
    shards = test_shards(cfg)
    ds = ShardDataset(build_index(shards, progress=False), range(len(shards)), bundle.to_tensor(),
                      label_key=cfg.dataset.label_key)
    triggers = attack.test_triggers() if attack is not None else {}
    pred, bd_preds, labels = predict(bundle, make_loader(ds, cfg.eval.batch_size), class_emb, device, triggers)
    if (labels < 0).any() or (labels >= len(classes)).any():
        raise ConfigError(f"evaluate: test labels outside [0, {len(classes)}) — is dataset.label_key="
                          f"{cfg.dataset.label_key} the json field holding the class index?")
    metrics = {"eval/clean_acc": accuracy(pred, labels)}
    if triggers:
        metrics |= attack_metrics(bd_preds, labels, triggers, classes)
    log.info("evaluate: %s (chance %.3f, %d test images)",
             "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()), 1 / len(classes), len(labels))
    return metrics
