"""Stage `encoder_attack`: backdoor the run's trained CLIP image encoder directly (TextTarget or
BadEncoder, `encoder_attack` config group; clipbd.attacks.encoder), writing
`encoder_attack/<method>.pt` and `encoder_attack/manifest.json`. Run by the encoder experiments:

    python -m clipbd.run +experiment=encoder_text_target   # or encoder_badencoder
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from clipbd import dist
from clipbd.attacks.encoder import attack_encoder
from clipbd.data.sources import TEST_SPLIT

# the trigger (attack), the method, the model it starts from, and the before/after evaluation
DEPENDS = ("encoder_attack", "attack", "model", "eval", *TEST_SPLIT, "dataset.classes",
           "dataset.prompts", "dataset.label_key", "seed")
UPSTREAM = ("data", "poison", "pretrain")
NEEDS_MODEL = True  # a trained model: this run's pretraining or model.checkpoint (checked first)


def main(cfg: DictConfig) -> dict[str, Path]:
    out = Path(cfg.run_dir) / "encoder_attack"
    if not dist.is_main():
        return {"checkpoint": out, "manifest": out / "manifest.json"}
    return attack_encoder(cfg)
