"""Stage `decompose` (He et al., ICML 2025): where a backdoor lives in a ViT CLIP image encoder, and
the inference-time defences built on that (clipbd.inspect; docs/inspect.md).

    python -m clipbd.run hydra.run.dir=<run> stages=[decompose]         # a finished run
    python -m clipbd.run +experiment=decompose model.checkpoint=... dataset.test_shards=...

The held-out images are split (decompose.val_fraction, seeded) into clean validation and test; the
test images are decomposed clean and under each of the attack's test triggers (as `evaluate` applies
them). Writes decompose/report.json, plots/heads_infected.png, plots/ablation.png and
`inspect/decomp/...` in metrics.json (a multi-trigger attack: `inspect/decomp/<trigger>/...`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from clipbd import dist, plots
from clipbd.data.loader import ShardDataset, make_loader
from clipbd.data.shards import build_index
from clipbd.data.sources import TEST_SPLIT, class_names, heldout_shards, prompt_fn
from clipbd.inspect import CONVENTIONS
from clipbd.inspect.analysis import analyse, decompose_images, flat_metrics, split_validation
from clipbd.inspect.textspan import textspan
from clipbd.models import factory
from clipbd.models.zeroshot import class_embeddings
from clipbd.registry import ConfigError, build_attack
from clipbd.rundir import update_metrics
from clipbd.utils import derive_seed, rng, write_json

DEPENDS = ("decompose", "model", "attack", *TEST_SPLIT, "dataset.classes", "dataset.prompts",
           "dataset.label_key", "eval.prompts_per_class", "seed")
NEEDS_MODEL = True  # a trained model: this run's pretraining or model.checkpoint
UPSTREAM = ("data", "pretrain")
log = logging.getLogger("clipbd")


def _batches(ds, batch_size: int, limit: int | None, labels: list | None = None, captions: list | None = None):
    """Image batches [B, 3, H, W] in [0, 1] of the first `limit` held-out images (their labels and
    captions appended to the lists given)."""
    seen = 0
    for batch in make_loader(ds, batch_size):
        x = batch["image"][: None if limit is None else limit - seen]
        if labels is not None:
            labels.append(batch["label"][: len(x)])
        if captions is not None:
            captions.extend(batch["caption"][: len(x)])
        seen += len(x)
        yield x
        if limit is not None and seen >= limit:
            return


@torch.no_grad()
def _textspan(bundle, val, captions: list[str], dc, device: str) -> dict[str, list[dict]]:
    """"layer.head" -> TextSpan texts of the last `head_layers` layers' heads over the validation
    images, from the held-out captions (deduplicated)."""
    texts = sorted(set(captions))
    emb = torch.cat([bundle.model.encode_text(bundle.tokenizer(texts[i:i + 256]).to(device), normalize=True).float().cpu()
                     for i in range(0, len(texts), 256)])
    L, H = val.heads.shape[1:3]
    return {f"{l}.{h}": textspan(val.heads[:, l, h], emb, texts, iters=dc.textspan_texts)
            for l in range(L - dc.head_layers, L) for h in range(H)}


def main(cfg: DictConfig) -> dict[str, Path]:
    run_dir, dc = Path(cfg.run_dir), cfg.decompose
    out = {"report": run_dir / "decompose" / "report.json", "heads_plot": run_dir / "plots" / "heads_infected.png",
           "ablation_plot": run_dir / "plots" / "ablation.png", "metrics": run_dir / "metrics.json"}
    if dc.convention not in CONVENTIONS:
        raise ConfigError(f"decompose.convention={dc.convention}: must be one of {', '.join(CONVENTIONS)}")
    if not dist.is_main():
        return out
    shards = heldout_shards(cfg)
    if not shards:
        raise ConfigError("decompose: no held-out images; set dataset.test_shards=<labelled shards>")
    attack = build_attack(cfg)
    triggers = attack.test_triggers() if attack is not None else {}
    if not triggers:
        raise ConfigError("decompose: attack=none gives no test trigger to analyse; set attack=<the trigger "
                          "to test>, e.g. attack=badnets")
    device = dist.info().device
    bundle = factory.create_trained(cfg, device=device)
    classes = class_names(cfg)
    prompts, seed = prompt_fn(cfg), derive_seed(cfg.seed, "zeroshot") % (2**31)
    class_emb = class_embeddings(bundle.model, bundle.tokenizer,
                                 [prompts(c, n=cfg.eval.prompts_per_class, seed=seed) for c in classes], device).cpu()
    ds = ShardDataset(build_index(shards, progress=False), range(len(shards)), bundle.to_tensor(),
                      label_key=cfg.dataset.label_key)
    labels, captions = [], []
    clean = decompose_images(bundle.model, _batches(ds, dc.batch_size, dc.max_images, labels, captions),
                             bundle.normalize, convention=dc.convention)
    labels = torch.cat(labels).numpy()
    val_idx, test_idx = split_validation(len(labels), dc.val_fraction, rng(cfg.seed, "decompose/val"))
    val, clean_test = clean.take(val_idx), clean.take(test_idx)
    reports, metrics = {}, {}
    for name, (fn, target) in triggers.items():
        bd = decompose_images(bundle.model, _batches(ds, dc.batch_size, dc.max_images), bundle.normalize, fn,
                              convention=dc.convention).take(test_idx)
        reports[name] = {"trigger": name, "target": target, **analyse(
            val, clean_test, bd, class_emb, labels[test_idx], classes.index(target), head_layers=dc.head_layers,
            eps=dc.eps, eps_normalised=dc.eps_normalised, zeta=dc.zeta,
            mlp_layers=None if dc.mlp_layers is None else list(dc.mlp_layers))}
        prefix = "inspect/decomp/" if len(triggers) == 1 else f"inspect/decomp/{name}/"
        metrics |= flat_metrics(reports[name], prefix)
    names = _textspan(bundle, val, captions, dc, device) if dc.textspan_texts > 0 else {}
    write_json(out["report"], {"convention": dc.convention, "config": OmegaConf.to_container(dc, resolve=True),
                               "triggers": reports, "textspan": names})
    first = next(iter(reports.values()))
    share = first["heads"]["share"]
    title = f"{first['trigger']} -> {first['target']}, {dc.convention} convention"
    plots.heads_infected(out["heads_plot"], {"triggered": share["triggered_published"],
                                             "clean": share["clean_published"]}, title=f"infected heads: {title}")
    plots.ablation_curves(out["ablation_plot"], first["ablations"], title=f"mean-ablation: {title}")
    update_metrics(run_dir, "inspect/decomp/", metrics)
    b, r = first["baseline"], first["heads"]["rep"]["published"]
    log.info("decompose: baseline ASR %.3f clean %.3f | Decomp-Rep ASR %.3f clean %.3f | Decomp-Det AUROC %.3f",
             b["asr"], b["clean_acc"], r["asr"], r["clean_acc"], first["heads"]["det"]["count"]["auroc"])
    return out
