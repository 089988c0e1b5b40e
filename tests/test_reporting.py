"""What a reader of a run is told: ranked.csv's order, score histograms, checkpoint errors, log lines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_cli
from omegaconf import OmegaConf

from clipbd.detectors.neighbourhood import Neighbourhood
from clipbd.detectors.ranking import sort_detector
from clipbd.models import factory
from clipbd.plots import histogram_bins
from clipbd.registry import ConfigError


def _one_line(err, *needles: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


# --- ranked.csv's order ------------------------------------------------------------------------


def test_default_sort_detector_skips_those_without_a_fixed_direction():
    dets = {m: Neighbourhood(method=m) for m in ("lid", "dao", "slof")}
    assert not dets["lid"].higher_is_suspicious and dets["dao"].higher_is_suspicious
    assert sort_detector(dets) == "dao"                    # LID first in the list, but DAO ranks
    assert sort_detector(dets, "slof") == "slof"           # report.sort_by names one
    assert sort_detector({"lid": dets["lid"]}) == "lid"    # nothing better: the first
    assert sort_detector({"mine": object(), "dao": dets["dao"]}) == "mine"  # plug-ins: higher = suspicious
    with pytest.raises(ConfigError) as err:
        sort_detector(dets, "kdsit")
    _one_line(err, "report.sort_by=kdsit", "lid, dao, slof")


# --- score histograms ----------------------------------------------------------------------------


def test_heavy_tailed_scores_spread_over_log_bins():
    rng = np.random.default_rng(0)
    dao = np.concatenate([rng.lognormal(0.0, 2.0, 2000), [1e6, 1e9, np.inf]])  # DAO-like: a few huge ratios
    bins, log_x = histogram_bins(dao)
    assert log_x and np.isfinite(bins).all()
    counts, _ = np.histogram(np.clip(dao[np.isfinite(dao)], bins[0], bins[-1]), bins=bins)
    assert counts.max() / counts.sum() < 0.1        # no single bin holds the mass
    # the range the plot used before (0.1-99.9 percentiles widened to every score) piles it in one bin
    old = np.linspace(dao[np.isfinite(dao)].min(), dao[np.isfinite(dao)].max(), 61)
    assert np.histogram(dao[np.isfinite(dao)], bins=old)[0].max() / len(dao) > 0.9
    normal = rng.normal(0, 1, 1000)
    bins, log_x = histogram_bins(normal)
    assert not log_x and bins[0] < -2 and bins[-1] > 2
    assert histogram_bins(np.full(5, 3.0))[0].size == 61  # constant scores still get a range


# --- checkpoint errors -------------------------------------------------------------------------------


def _arch(width: int) -> dict:
    return {"embed_dim": 16,
            "vision_cfg": {"image_size": 16, "patch_size": 8, "width": width, "layers": 1, "head_width": 16},
            "text_cfg": {"context_length": 8, "vocab_size": 1000, "width": width, "heads": 2, "layers": 1}}


def _mcfg(name: str, arch: dict | None = None, checkpoint=None):
    return OmegaConf.create({"name": name, "arch": arch, "checkpoint": checkpoint, "precision": "fp32"})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model `clipbd-test-a` (width 32) and its checkpoints: clipbd's own and a bare state dict."""
    d = tmp_path_factory.mktemp("ckpt")
    bundle = factory.create(_mcfg("clipbd-test-a", _arch(32)))
    sd = bundle.model.state_dict()
    torch.save({"model": sd, "name": bundle.name, "arch": bundle.arch, "epoch": 1}, d / "clipbd.pt")
    torch.save({"state_dict": sd}, d / "open_clip.pt")
    return d


def test_state_dict_of_another_architecture_is_one_line(tiny):
    with pytest.raises(ConfigError) as err:
        factory.create(_mcfg("clipbd-test-b", _arch(64)), checkpoint=tiny / "open_clip.pt")
    _one_line(err, "another architecture", "model.name=clipbd-test-b", "differ in shape", "[", "open_clip.pt")


def test_clipbd_checkpoint_of_another_model_is_refused(tiny):
    with pytest.raises(ConfigError) as err:
        factory.create(_mcfg("RN50"), checkpoint=tiny / "clipbd.pt")
    _one_line(err, "is a clipbd-test-a model", "model.name=RN50", "model.name=clipbd-test-a")
    # the same model name with other arch values: the checkpoint's own architecture, said in the log
    bundle = factory.create(_mcfg("clipbd-test-a", _arch(48)), checkpoint=tiny / "clipbd.pt")
    assert bundle.arch == _arch(32)


def test_truncated_checkpoint_is_not_called_a_security_refusal(tiny, tmp_path):
    data = (tiny / "clipbd.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError) as err:
        factory.read_checkpoint(cut)
    msg = _one_line(err, "cut.pt", "truncated or corrupt", "bytes")
    assert "pickled code" not in msg

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, evil)
    with pytest.raises(ConfigError) as err:
        factory.read_checkpoint(evil)
    _one_line(err, "evil.pt", "never executes pickled code")


# --- log lines -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_no_attack_is_said_in_words(tmp_path):
    proc = run_cli("+experiment=smoke", "attack=none", f"hydra.run.dir={tmp_path}/r", "stages=[data,poison]",
                   "logging.wandb.mode=disabled")
    line = next(ln for ln in proc.stderr.splitlines() if "poison plan" in ln)
    assert "no attack" in line and "None" not in line
