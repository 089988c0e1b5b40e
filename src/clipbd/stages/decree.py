"""Stage `decree`: DECREE (Feng et al., CVPR 2023) on the run's encoder — invert the smallest
trigger that collapses the image embeddings of clean shadow images (clipbd.inspect.decree).

    python -m clipbd.run hydra.run.dir=<run> stages=[decree]           # the run's own checkpoint
    python -m clipbd.run +experiment=decree model.checkpoint=<file>    # any checkpoint

Writes decree/{mask,pattern,fusion,stamped}.png, decree/result.json, decree/curve.csv,
plots/decree.png (the optimisation curve), plots/decree_trigger.png, and metrics
inspect/decree/{pl1,l1,l1_published,seconds,epochs,found,verdict_paper[,threshold_calibrated,
verdict_calibrated][,true_mask_share][,zscore,zscore_trojaned]}. A verdict is True for "trojaned".
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from clipbd import dist, tracking
from clipbd.data.loader import read_images
from clipbd.data.shards import expand_shards
from clipbd.data.sources import TEST_SPLIT
from clipbd.inspect import decree as D
from clipbd.inspect.decree_plots import curve_plot, image_row
from clipbd.models import factory
from clipbd.registry import ConfigError, build
from clipbd.rundir import update_metrics
from clipbd.utils import atomic_path, derive_seed, read_json, write_json

DEPENDS = ("decree", "model", "attack", "seed", *TEST_SPLIT)  # the shadow set: decree.shards or the test split
NEEDS_MODEL = True  # a trained model: this run's pretraining or model.checkpoint
UPSTREAM = ("data", "pretrain")
log = logging.getLogger("clipbd")


def _inversion_config(cfg: DictConfig) -> D.DecreeConfig:
    values = OmegaConf.to_container(cfg.decree.inversion, resolve=True)
    try:
        inv = D.config_from(values)
        D.check_config(inv, max(int(cfg.decree.shadow_size), 2))
        D.normalisation(cfg.decree.normalization, (0,) * 3, (1,) * 3)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return inv


def _shadow_shards(cfg: DictConfig) -> list[str]:
    if cfg.decree.shards is not None:
        node = cfg.decree.shards
        return expand_shards(node if isinstance(node, str) else OmegaConf.to_container(node))
    manifest = Path(cfg.run_dir) / "data.json"
    shards = read_json(manifest)["test_shards"] if manifest.exists() else []
    if not shards:
        raise ConfigError("decree: no shadow images — the run has no held-out test shards; set "
                          "decree.shards=<clean image shards> (a pattern, directory or list)")
    return list(shards)


def _clean_pl1(cal: DictConfig) -> list[float]:
    vals = [float(v) for v in cal.clean_pl1]
    for p in cal.clean_results:
        if not Path(p).is_file():
            raise ConfigError(f"decree.calibration.clean_results: {p} does not exist (a clean run's decree/result.json)")
        vals.append(float(read_json(p)["pl1"]))
    return vals


def _attack(cfg: DictConfig):
    """The configured attack (its test trigger is the known truth), bound to the run's plan."""
    if not cfg.attack or cfg.attack.get("_target_") is None:
        return None
    attack = build(cfg.attack, "attack")
    plan = Path(cfg.run_dir) / "poison_plan.json"
    if plan.exists() and read_json(plan).get("attack") == getattr(attack, "name", None):
        attack.bind(read_json(plan), cfg.run_dir)
    return attack


def verdicts(cfg: DictConfig, pl1: float) -> dict:
    """verdict_paper (PL1 < the paper's 0.1) and, with clean encoders given, the calibrated one."""
    out = {"verdict_paper": pl1 < float(cfg.decree.paper_threshold)}
    clean = _clean_pl1(cfg.decree.calibration)
    if clean:
        cal = cfg.decree.calibration
        try:
            thr = D.calibrated_threshold(clean, cal.method, float(cal.factor), float(cal.z))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        out |= {"threshold_calibrated": thr, "verdict_calibrated": pl1 < thr}
    return out


def _truth(attack, result: D.DecreeResult, shadow: torch.Tensor) -> tuple[dict, list]:
    """Share of the inverted mask on the true trigger's *test-time* position (patch attacks) and
    the true trigger's panels. An attack trained at random positions (the default BadNets) is
    triggered anywhere, so a low share there does not mean a wrong trigger."""
    if attack is None:
        return {}, []
    panels = [("true: example", attack.apply_test(shadow[0].cpu()))]
    if not hasattr(attack, "mask_and_pattern"):
        return {}, panels
    mask, pattern = attack.mask_and_pattern(*shadow.shape[-2:])
    share = D.mask_share_in(result.mask.cpu(), mask[0])
    return {"true_mask_share": share, "true_mask_pixels": float(mask.sum())}, [("true: mask", mask[0])] + panels


def _zscore(cfg: DictConfig, attack, encode, shadow: torch.Tensor) -> dict:
    zc = cfg.decree.zscore
    if attack is None or not zc.enabled:
        return {}
    x = shadow[: int(zc.num_images)]
    trig = torch.stack([attack.apply_test(img) for img in x.cpu()]).to(x.device)
    with torch.no_grad():
        r = D.zscore(encode(x), encode(trig), faithful=bool(zc.faithful), threshold=float(zc.threshold))
    return {"zscore": r.z, "zscore_trojaned": r.trojaned, "zscore_mean_clean": r.mean_clean,
            "zscore_mean_triggered": r.mean_triggered}


def _write_images(out: Path, result: D.DecreeResult, shadow: torch.Tensor, examples: int) -> None:
    from clipbd.attacks.targeted import save_png

    with atomic_path(out / "mask.png") as tmp:
        from PIL import Image

        Image.fromarray((result.mask.cpu().numpy() * 255).round().astype("uint8"), mode="L").save(tmp, format="png")
    save_png(result.pattern.cpu(), out / "pattern.png")
    save_png((result.mask * result.pattern).cpu(), out / "fusion.png")
    x = shadow[:examples].cpu()
    stamped = D.stamp(x, result.mask.cpu(), result.pattern.cpu())
    image_row(out / "stamped.png", [("clean", img) for img in x] + [("stamped", img) for img in stamped], rows=2)


def _write_curve(path: Path, curve: dict[str, list[float]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", *curve])
        w.writerows([i, *row] for i, row in enumerate(zip(*curve.values())))


def main(cfg: DictConfig) -> dict[str, Path]:
    run_dir, out = Path(cfg.run_dir), Path(cfg.run_dir) / "decree"
    files = {n: out / f"{n}.png" for n in ("mask", "pattern", "fusion", "stamped")}
    files |= {"result": out / "result.json", "curve": out / "curve.csv", "plot": run_dir / "plots" / "decree.png",
              "trigger_plot": run_dir / "plots" / "decree_trigger.png", "metrics": run_dir / "metrics.json"}
    if not dist.is_main():
        return files
    inv = _inversion_config(cfg)
    verdicts(cfg, 1.0)  # calibration inputs are checked before the model is loaded
    attack = _attack(cfg)
    device = dist.info().device
    bundle = factory.create_trained(cfg, device=device)
    shadow = read_images(_shadow_shards(cfg), bundle.to_tensor(), int(cfg.decree.shadow_size)).to(device)
    mean, std = D.normalisation(cfg.decree.normalization, bundle.mean, bundle.std)
    encode = D.model_encoder(bundle.model)
    for p in bundle.model.parameters():
        p.requires_grad_(False)
    log.info("decree: %d shadow images at %d px, %s normalisation", len(shadow), shadow.shape[-1], cfg.decree.normalization)
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, "decree"))
    result = D.invert(encode, shadow, inv, g, mean=mean, std=std)
    zs = _zscore(cfg, attack, lambda x: encode(D.normalise(x, mean, std)), shadow)
    truth, truth_panels = _truth(attack, result, shadow)
    summary = result.summary() | verdicts(cfg, result.pl1) | truth | zs
    out.mkdir(parents=True, exist_ok=True)
    _write_images(out, result, shadow, int(cfg.decree.examples))
    _write_curve(files["curve"], result.curve)
    curve_plot(files["plot"], result.curve, result.mask.numel(), inv.success_threshold, result.pl1)
    image_row(files["trigger_plot"], [("inverted mask", result.mask), ("pattern", result.pattern),
                                      ("mask·pattern", result.mask * result.pattern), *truth_panels])
    write_json(files["result"], summary | {"shadow_images": len(shadow), "normalization": cfg.decree.normalization,
                                           "inversion": OmegaConf.to_container(cfg.decree.inversion, resolve=True)})
    for cos, l1, lam in zip(result.curve["cos"], result.curve["l1"], result.curve["lambda"]):  # W&B curve
        tracking.log({"decree/cos": cos, "decree/pl1": l1 / result.mask.numel(), "decree/lambda": lam})
    update_metrics(run_dir, "inspect/decree/", {f"inspect/decree/{k}": v for k, v in summary.items()
                                                if isinstance(v, (bool, int, float))})
    log.info("decree: PL1 %.4f (L1 %.1f px of %d; %s) in %.0f s, %d epochs; verdict (paper 0.1) %s%s",
             result.pl1, result.l1, result.mask.numel(), "found" if result.found else "no trigger found",
             result.seconds, result.epochs, summary["verdict_paper"],
             f", calibrated {summary['verdict_calibrated']} (< {summary['threshold_calibrated']:.4f})"
             if "verdict_calibrated" in summary else "")
    return files
