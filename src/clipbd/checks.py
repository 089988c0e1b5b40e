"""Every check the config alone can answer, run before any stage (`runstate.check_stages`, called at
the start of every run, and the composition check of the command line): a value that cannot work
fails in seconds, in one line naming the key and the fix (`clipbd: error: ...`, exit 2), not after
pretraining. Stage-specific checks live in the stages' `check(cfg)` hooks, run right after these.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from clipbd.errors import ConfigError

# key -> allowed values
ENUMS = {
    "data.on_error": ("skip", "raise"),
    "model.precision": ("fp32", "amp", "bf16"),
    "train.reading": ("exact", "by_rank"),  # docs/slurm.md, "DDP pretraining"
    "train.schedule": ("cosine", "wsd"),
    "logging.progress": ("auto", "always", "never"),
    "logging.wandb.mode": ("online", "offline", "disabled"),
}
# key -> smallest allowed value
MINIMA = {
    "train.epochs": 1, "train.batch_size": 1, "train.log_every": 1, "train.shuffle_buffer": 1,
    "train.warmup_steps": 0, "train.workers": 0, "train.checkpoint_every": 0,
    "train.prefetch": 0, "extract.prefetch": 0,
    "extract.batch_size": 1, "extract.shards_per_group": 1, "extract.workers": 0,
    "eval.batch_size": 1, "eval.prompts_per_class": 1, "data.workers": 1, "scoring.batch_size": 2,
    "scoring.bank_size": 2,
}
_HINT = {"train.checkpoint_every": " (0 keeps only latest.pt)", "data.workers": " indexing threads"}


def check_values(cfg: DictConfig) -> None:
    """Enumerations and numeric ranges of the plumbing (clipbd.config)."""
    for key, allowed in ENUMS.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value}: must be one of {', '.join(allowed)}")
    for key, low in MINIMA.items():
        value = _get(cfg, key)
        if value is not None and value < low:
            raise ConfigError(f"{key}={value}: must be >= {low}{_HINT.get(key, '')}")
    fraction = _get(cfg, "train.decay_fraction")
    if fraction is not None and not 0 < fraction <= 1:
        raise ConfigError(f"train.decay_fraction={fraction}: the share of the steps over which train.schedule=wsd "
                          "decays the learning rate to 0 must be in (0, 1]")
    ema = _get(cfg, "train.ema_decay")
    if ema is not None and not 0 < ema < 1:
        raise ConfigError(f"train.ema_decay={ema}: the weight average's decay per step must be in (0, 1), "
                          "e.g. 0.999 (an average over about 1,000 steps), or null for no average")


def check_plugins(cfg: DictConfig) -> None:
    """Build (never run) the plug-ins the selected stages use, so that their own checks
    (attack.poison_rate in [0, 1], detector k >= 1, the scoring mode's settings, report.sort_by
    naming a detector) fail now. Call only after registry.check_targets."""
    from clipbd.registry import build, build_detectors

    stages = set(cfg.stages)
    if cfg.attack and cfg.attack.get("_target_") is not None:
        build(cfg.attack, "attack")
    if cfg.get("encoder_attack") and "encoder_attack" in stages:
        build(cfg.encoder_attack, "encoder_attack")
    if stages & {"extract", "reduce"}:
        from clipbd import scoring
        from clipbd.detectors.ranking import sort_detector

        detectors = build_detectors(cfg)
        scoring.build_scoring(cfg).check(detectors)
        sort_detector(detectors, cfg.report.sort_by)


def check_inputs(cfg: DictConfig) -> None:
    """The training shards exist when the data stage will index them (a missing or mistyped path
    fails now, naming it, not after other work)."""
    from omegaconf import OmegaConf

    from clipbd.data.shards import expand_shards

    shards = cfg.dataset.shards
    if "data" in cfg.stages and shards is not None:
        expand_shards(shards if isinstance(shards, str) else OmegaConf.to_container(shards, resolve=True))


def check_checkpoint(cfg: DictConfig, needs_model: list[str]) -> None:
    """`model.checkpoint`, when given, is a file; stages that need a trained model (`needs_model`)
    have one: pretraining in this run, the run's own checkpoints/latest.pt, or model.checkpoint."""
    ckpt = cfg.model.checkpoint
    if ckpt and not Path(ckpt).is_file():
        raise ConfigError(f"model.checkpoint={ckpt}: no such file; point it at a clipbd or open_clip checkpoint")
    latest = Path(cfg.run_dir) / "checkpoints" / "latest.pt"
    if needs_model and not ckpt and "pretrain" not in cfg.stages and not latest.exists():
        raise ConfigError(f"stages={list(cfg.stages)}: {', '.join(needs_model)} need(s) a trained model and "
                          f"{latest} does not exist; add pretrain to stages, or set model.checkpoint=<file>")


def _get(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = node.get(part) if node is not None else None
    return node
