"""Trigger inversion for a caption (clipbd.inspect.invert; stage `invert`)."""

from __future__ import annotations

import json
import shutil

import torch

from clipbd.inspect.invert import attack_success, candidate_classes, invert, stamp
from conftest import run_cli


def _toy_encoder():
    """A 'model' with a known trigger: the target direction grows with the top-left 4x4 patch's red."""
    def encode(x: torch.Tensor) -> torch.Tensor:  # x [B, 3, 16, 16] -> [B, 2]
        patch = x[:, 0, :4, :4].mean((1, 2))
        return torch.stack([torch.full_like(patch, 0.5), 3.0 * patch], 1)
    return encode


def test_inversion_finds_the_small_trigger_of_a_toy_model():
    g = torch.Generator().manual_seed(0)
    images = 0.1 * torch.rand(128, 3, 16, 16, generator=g)
    class_emb = torch.eye(2)  # class 0: clean, class 1: the caption
    encode = _toy_encoder()
    inv = invert(encode, images[:64], class_emb, 1, steps=300, lr=0.1, batch_size=32, lam=1e-2, generator=g)
    m = attack_success(encode, images[64:], torch.zeros(64, dtype=torch.long), class_emb, 1, inv.mask, inv.pattern, None)
    assert inv.reached_goal and m["asr"] >= 0.9 and m["clean_rate"] == 0.0
    assert float(inv.mask.sum()) < 40  # the trigger is 16 px; the start was 128 px (0.5 everywhere)
    assert float(inv.mask[0, :4, :4].sum()) > 0.6 * float(inv.mask.sum())  # and it is found where it is


def test_stamp_and_the_caption_replacing_its_own_class():
    x, m, p = torch.zeros(1, 3, 2, 2), torch.tensor([[[1.0, 0.0], [0.5, 0.0]]]), torch.ones(3, 2, 2)
    assert stamp(x, m, p)[0, 0].tolist() == [[1.0, 0.0], [0.5, 0.0]]
    assert candidate_classes(["circle", "banana", "ring"], "a large red banana") == ([0, 2], 1)
    assert candidate_classes(["circle", "banana"], "the birthday cake with candles") == ([0, 1], None)


def test_invert_stage_writes_metrics_pngs_and_the_report_shows_them(smoke_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(smoke_run[0], run_dir, ignore=shutil.ignore_patterns("wandb", "epoch_*.pt"))
    proc = run_cli("+experiment=smoke", f"hydra.run.dir={run_dir}", "stages=[invert,report]", "invert.caption=target",
                   "invert.steps=5", "invert.num_images=32", "logging.wandb.mode=disabled")
    assert "stage invert   done" in proc.stderr and "stage report   done" in proc.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for role in ("target", "control"):
        assert 0 <= metrics[f"inspect/invert/{role}/asr"] <= 1 and metrics[f"inspect/invert/{role}/mask_l1"] > 0
        assert (run_dir / "invert" / f"{role}_mask.png").stat().st_size > 0
    assert metrics["inspect/invert/real_trigger_px"] == 64  # smoke's BadNets patch: 8 x 8
    page = (run_dir / "report" / "index.html").read_text()
    assert "Trigger inversion" in page and page.count('alt="mask"') == 2
    bad = run_cli("+experiment=smoke", f"hydra.run.dir={run_dir}", "stages=[invert]", "logging.wandb.mode=disabled",
                  check=False)
    assert bad.returncode == 2 and "invert.caption" in bad.stderr
