"""The attack zoo: seeded plans, triggers in range and shape, clean-label captions untouched, a
smooth WaNet field, every conf/attack running the poison stage, per-trigger ASR, encoder attacks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import CONF, compose_cfg

from clipbd.attacks import triggers
from clipbd.attacks.badnets import BadNets
from clipbd.attacks.blend import Blend
from clipbd.attacks.multi import MultiTrigger
from clipbd.attacks.nashville import Nashville
from clipbd.attacks.plan import PoisonLookup
from clipbd.attacks.plugin import PluginTrigger
from clipbd.attacks.sig import SIG
from clipbd.attacks.wanet import WaNet
from clipbd.utils import rng

POOL = [f"a banana number {i}" for i in range(20)]
ATTACKS = sorted(p.stem for p in (CONF / "attack").glob("*.yaml") if p.stem != "none")
# configs that only re-set another attack's parameters (badnets_32px: the default's 8 px BadNets)
VARIANTS = {p.stem for p in (CONF / "attack").glob("*.yaml") if "defaults:" in p.read_text()}
# Uniform classes: the default world makes the target rare (~1%), too few bananas in the smoke data
# for the clean-label attack, which can only poison images whose captions already name it.
SMOKE = ["+experiment=smoke", "dataset.synthetic.world.class_weights=null"]
# Small but real settings for the attacks whose plan optimises or reads much.
FAST = {"badclip": ["attack.steps=2", "attack.surrogate_epochs=1", "attack.num_images=16", "attack.batch_size=8"]}


def _pure_attacks():
    return {
        "badnets": BadNets(poison_rate=0.05, patch_size=8),
        "blend": Blend(poison_rate=0.05),
        "sig": SIG(poison_rate=0.05),
        "wanet": WaNet(poison_rate=0.05),
        "nashville": Nashville(poison_rate=0.05),
        "plugin": PluginTrigger(poison_rate=0.05, generator="clipbd.attacks.triggers.sig",
                                generator_kwargs={"delta": 0.1, "freq": 3}),
        "multi": MultiTrigger({"b": BadNets(patch_size=8), "s": SIG(), "w": WaNet()}, poison_rate=0.05),
    }


def _poisoned_pixels(attack, plan, images):
    lk = PoisonLookup(plan)
    return torch.stack([attack.apply(images[i], "a caption", lk.get(i))[0] for i in plan["poison_indices"]])


@pytest.mark.parametrize("name", list(_pure_attacks()))
def test_same_seed_same_plan_and_pixels_other_seed_differs(name):
    images = torch.rand(200, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a1, a2, a3 = _pure_attacks()[name], _pure_attacks()[name], _pure_attacks()[name]
    p1, p2 = a1.plan(200, rng(0, "poison"), POOL), a2.plan(200, rng(0, "poison"), POOL)
    p3 = a3.plan(200, rng(1, "poison"), POOL)
    assert json.dumps(p1) == json.dumps(p2)
    assert p1["poison_indices"] != p3["poison_indices"]
    x1, x2 = _poisoned_pixels(a1, p1, images), _poisoned_pixels(a2, p2, images)
    assert torch.equal(x1, x2)
    assert not torch.equal(x1, images[p1["poison_indices"]])
    if "trigger" in p1 and name not in ("multi",):  # trigger state drawn from the seed differs too
        assert p1["trigger"] != p3["trigger"]


@pytest.mark.parametrize("name", list(_pure_attacks()))
def test_triggers_keep_shape_and_range(name):
    attack = _pure_attacks()[name]
    plan = attack.plan(100, rng(0, "poison"), POOL)
    lk = PoisonLookup(plan)
    for size in (32, 48):
        img = torch.rand(3, size, size)
        for i in plan["poison_indices"]:
            out, cap = attack.apply(img, "orig", lk.get(i))
            assert out.shape == img.shape and out.dtype == img.dtype
            assert out.min() >= 0 and out.max() <= 1 and cap in POOL
        for fn, target in attack.test_triggers().values():
            out = fn(img)
            assert out.shape == img.shape and 0 <= out.min() and out.max() <= 1 and target == "banana"


def test_wanet_field_is_smooth_not_per_pixel_jitter():
    attack = WaNet(poison_rate=0.05, k=4, s=0.5)
    attack.plan(100, rng(0, "poison"), POOL)
    h = w = 64
    ident = triggers.wanet_grid(torch.zeros(2, 4, 4), h, w, 0.5)
    # [h, w, 2] in pixels, away from the border (where grid clipping pins the displacement to 0)
    disp = ((attack.grid(h, w) - ident)[0] * torch.tensor([w, h]) / 2)[2:-2, 2:-2]
    step = (disp[1:] - disp[:-1]).abs().mean() + (disp[:, 1:] - disp[:, :-1]).abs().mean()
    assert disp.abs().mean() > 0.1  # it moves pixels (s = 0.5: ~0.25 px on average)
    assert step < 0.25 * disp.abs().mean()  # neighbours move together: a smooth field
    noisy = ((attack.grid(h, w, noise_seed=3) - ident)[0] * torch.tensor([w, h]) / 2)[2:-2, 2:-2]
    nstep = (noisy[1:] - noisy[:-1]).abs().mean()
    assert nstep > 5 * step  # the noise mode adds per-pixel jitter on top
    # the same field whatever the resolution: displacement at matching points agrees
    full = (attack.grid(h, w) - ident)[0] * torch.tensor([w, h]) / 2
    small = (attack.grid(32, 32) - triggers.wanet_grid(torch.zeros(2, 4, 4), 32, 32, 0.5))[0] * 16
    assert torch.allclose(small[16, 16], full[32, 32], atol=0.03)  # ~ the same point of the field


def test_wanet_noise_samples_keep_captions_and_are_not_poisons():
    attack = WaNet(poison_rate=0.02, cross_ratio=2)
    plan = attack.plan(500, rng(0, "poison"), POOL)
    assert len(plan["noise_indices"]) == 2 * plan["poison_count"]
    assert not set(plan["noise_indices"]) & set(plan["poison_indices"])
    lk = PoisonLookup(plan)
    assert lk.labels(500).sum() == plan["poison_count"]
    entry = lk.get(plan["noise_indices"][0])
    img = torch.rand(3, 32, 32)
    out, cap = attack.apply(img, "mine", entry)
    assert cap == "mine" and not torch.equal(out, attack.apply_test(img))


def test_nashville_is_a_colour_map():
    img = torch.rand(3, 16, 16)
    img[:, 0, 0] = img[:, 5, 7] = torch.tensor([0.2, 0.5, 0.9])
    out = triggers.nashville(img)
    assert torch.equal(out[:, 0, 0], out[:, 5, 7])  # per pixel, position independent
    white = triggers.nashville(torch.ones(3, 1, 1))[:, 0, 0]
    assert white[0] > white[2]  # warm: the darken layer (247, 176, 153) pulls blue down most
    assert (out - img).abs().mean() > 0.02


def test_sig_is_a_horizontal_sinusoid_scaled_to_width():
    v32, v64 = triggers.sig_signal(32, 32, 0.1, 6), triggers.sig_signal(64, 64, 0.1, 6)
    assert torch.equal(v32[0, 0], v32[0, 31])  # constant down each column
    assert v32.abs().max() <= 0.1 + 1e-6
    assert torch.allclose(v32[0, 0, ::8], v64[0, 0, ::16], atol=1e-6)  # same periods across the width


def test_multi_splits_poisons_over_triggers_and_reports_per_trigger():
    attack = MultiTrigger({"b": BadNets(patch_size=8), "s": SIG()}, poison_rate=0.1)
    plan = attack.plan(200, rng(0, "poison"), POOL)
    names = plan["trigger_name"]
    assert sorted(set(names)) == ["b", "s"] and abs(names.count("b") - names.count("s")) <= 1
    assert set(attack.test_triggers()) == {"b", "s"}
    from clipbd.models.evaluation import attack_metrics

    labels = np.array([0, 1, 2, 2, 1])
    m = attack_metrics({"b": np.array([2, 2, 2, 2, 1]), "s": np.array([0, 1, 2, 2, 2])}, labels,
                       attack.test_triggers() | {}, ["circle", "square", "banana"])
    assert m["attack/b/asr"] == pytest.approx(2 / 3) and m["attack/s/asr"] == pytest.approx(1 / 3)
    assert m["attack/asr"] == pytest.approx(0.5)
    assert m["attack/b/bd_acc"] == pytest.approx(1 / 3) and m["attack/s/bd_acc"] == pytest.approx(2 / 3)


def test_plugin_trigger_file(tmp_path):
    path = tmp_path / "trig.pt"
    torch.save({"pattern": torch.ones(3, 4, 4), "mask": torch.zeros(1, 4, 4).index_fill_(1, torch.tensor([0]), 1.0)}, path)
    a = PluginTrigger(trigger=str(path))
    out = a.apply_test(torch.zeros(3, 32, 32))
    assert out.shape == (3, 32, 32) and out[:, :8].min() == 1 and out[:, 16:].max() == 0
    with pytest.raises(ValueError, match="exactly one"):
        PluginTrigger()


# ------------------------------------------------------------------ through the poison stage
@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    """Smoke-sized synthetic shards and their index, written once."""
    from clipbd.stages import data

    d = tmp_path_factory.mktemp("zoo") / "data_run"
    cfg = compose_cfg(SMOKE, run_dir=d)
    data.main(cfg)
    return d


def _run_dir(smoke_data, tmp_path):
    for f in ("data_index.h5", "data.json"):
        shutil.copy(smoke_data / f, tmp_path / f)
    return tmp_path


def _poison(name, run_dir, extra=()):
    from clipbd.stages import poison

    cfg = compose_cfg([*SMOKE, f"attack={name}", *FAST.get(name, []), *extra], run_dir=run_dir)
    poison.main(cfg)
    return cfg, json.loads((run_dir / "poison_plan.json").read_text())


@pytest.mark.parametrize("name", ATTACKS)
def test_every_attack_config_runs_the_poison_stage(name, smoke_data, tmp_path):
    from clipbd.data.loader import ShardDataset
    from clipbd.data.sources import load_index
    from clipbd.registry import build_attack

    cfg, plan = _poison(name, _run_dir(smoke_data, tmp_path))
    assert plan["attack"] == build_attack(cfg, bind=False).name and plan["poison_count"] == 8
    attack = build_attack(cfg)  # bound to the plan, as pretrain/extract/evaluate build it
    index = load_index(cfg)
    ds = ShardDataset(index, [0, 1, 2, 3], lambda im: torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255,
                      PoisonLookup(plan), attack)
    seen = [it for it in ds if it["poisoned"]]
    assert len(seen) == 8
    for it in seen:
        assert it["image"].shape == (3, 32, 32) and 0 <= it["image"].min() and it["image"].max() <= 1
    for fn, _ in attack.test_triggers().values():
        out = fn(seen[0]["image"])
        assert out.shape == (3, 32, 32) and 0 <= out.min() and out.max() <= 1


@pytest.mark.parametrize("name", ["badnets_clean_label", "targeted"])
def test_context_attacks_are_deterministic(name, smoke_data, tmp_path):
    for d in "abc":
        (tmp_path / d).mkdir()
    _, p1 = _poison(name, _run_dir(smoke_data, tmp_path / "a"))
    _, p2 = _poison(name, _run_dir(smoke_data, tmp_path / "b"))
    _, p3 = _poison(name, _run_dir(smoke_data, tmp_path / "c"), ["seed=1"])
    assert json.dumps(p1) == json.dumps(p2) and p1["poison_indices"] != p3["poison_indices"]
    if name == "targeted":
        a, b = (tmp_path / d / p1["trigger"]["image_file"] for d in "ab")
        assert a.read_bytes() == b.read_bytes()


def test_clean_label_leaves_every_caption_unchanged(smoke_data, tmp_path):
    from clipbd.data.loader import ShardDataset
    from clipbd.data.shards import iter_shard
    from clipbd.data.sources import load_index
    from clipbd.registry import build_attack

    cfg, plan = _poison("badnets_clean_label", _run_dir(smoke_data, tmp_path), ["attack.poison_rate=0.05"])
    index = load_index(cfg)
    raw = [s.caption for p in index.shards for s in iter_shard(p)]
    assert all("banana" in raw[i] for i in plan["poison_indices"]) and plan["poison_count"] == 20
    to_t = lambda im: torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255  # noqa: E731
    ds = ShardDataset(index, range(len(index.shards)), to_t, PoisonLookup(plan), build_attack(cfg))
    items = list(ds)
    assert [it["caption"] for it in items] == raw
    poisoned = [it for it in items if it["poisoned"]]
    assert len(poisoned) == 20
    assert all(not torch.equal(it["image"], to_t(np.zeros((32, 32, 3), np.uint8))) for it in poisoned)


def test_encoder_attacks_write_checkpoint_and_manifest(smoke_data, tmp_path):
    from clipbd.attacks.encoder import attack_encoder
    from clipbd.models import factory
    from clipbd.models.factory import read_checkpoint
    from clipbd.stages import poison

    for method in ("text_target", "badencoder"):
        (tmp_path / method).mkdir()
        run_dir = _run_dir(smoke_data, tmp_path / method)
        cfg = compose_cfg(["+experiment=smoke", f"+encoder_attack={method}", "attack.poison_rate=0",
                           "encoder_attack.steps=1", "encoder_attack.num_shadow=8", "encoder_attack.batch_size=4"],
                          run_dir=run_dir)
        bundle = factory.create(cfg.model)  # a tiny untrained model stands in for the clean one
        torch.save({"model": bundle.model.state_dict(), "name": bundle.name, "arch": bundle.arch}, run_dir / "clean.pt")
        cfg.model.checkpoint = str(run_dir / "clean.pt")
        poison.main(cfg)
        out = attack_encoder(cfg)
        man = json.loads(out["manifest"].read_text())
        assert man["method"] == method and (run_dir / man["checkpoint"]).exists()
        assert (run_dir / man["trigger"]["mask_pattern"]).exists() and man["trigger"]["attack"]["patch_size"] == 8
        assert set(man["metrics_after"]) >= {"eval/clean_acc", "attack/asr", "attack/bd_acc"}
        before, after = read_checkpoint(run_dir / "clean.pt")["state_dict"], read_checkpoint(out["checkpoint"])["state_dict"]
        changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
        assert changed == {"visual"}  # only the image tower moved


# ------------------------------------------------------------------ the sweep and its scripts
SWEEP = sorted(p.stem for p in (CONF / "experiment" / "attacks").glob("*.yaml"))


def test_sweep_rows_cover_every_attack_and_compose(tmp_path):
    from conftest import ROOT

    from clipbd.registry import check_node

    assert VARIANTS == {"badnets_32px"}
    assert set(SWEEP) == set(ATTACKS) - VARIANTS | {"none", "none_uniform"}  # clean references of both worlds
    readme = (ROOT / "experiments" / "attacks" / "README.md").read_text()
    for name in SWEEP:
        assert f"attacks/{name}" in readme  # the documented command runs every row
        cfg = compose_cfg([f"+experiment=attacks/{name}"], run_dir=tmp_path)
        assert cfg.name == f"attacks_{name}"
        if not name.startswith("none"):
            check_node(cfg.attack, "attack")


def _script(name):
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / "attacks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_grid_and_collect_scripts(smoke_data, tmp_path):
    from omegaconf import OmegaConf

    (tmp_path / "run").mkdir()
    run = _run_dir(smoke_data, tmp_path / "run")
    cfg, plan = _poison("multi", run)
    OmegaConf.save(cfg, run / "config.yaml", resolve=True)
    assert _script("grid").main([str(run), "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").stat().st_size > 1000
    # the collector on the run plus a clean one (metrics as the evaluate/reduce stages write them)
    clean = tmp_path / "clean"
    (clean / "stages").mkdir(parents=True)
    OmegaConf.save(cfg, clean / "config.yaml", resolve=True)  # same data, no attack: the reference
    (clean / "metrics.json").write_text(json.dumps({"eval/clean_acc": 0.5}))
    other = tmp_path / "other_world"  # a clean run on other data is no reference for this one
    other.mkdir()
    OmegaConf.save(OmegaConf.merge(cfg, {"dataset": {"synthetic": {"num_train": 123}}}), other / "config.yaml", resolve=True)
    (other / "metrics.json").write_text(json.dumps({"eval/clean_acc": 0.9}))
    (run / "metrics.json").write_text(json.dumps({"eval/clean_acc": 0.45, "attack/asr": 0.9,
                                                  "attack/badnets/asr": 1.0, "detect/dao/auroc": 0.8}))
    (run / "stages").mkdir()
    for stage, seconds in [("poison", 1.5), ("pretrain", 2.0)]:  # stage markers: what the outputs cost
        (run / "stages" / f"{stage}.json").write_text(json.dumps({"stage": stage, "seconds": seconds}))
    assert _script("collect").main([str(tmp_path), "--out", str(tmp_path / "t")]) == 0
    text = (tmp_path / "t" / "results.md").read_text()
    assert "| multi | smoke | 0 | 0.020 | 8 | 0.900 |" in text and "multi:badnets" in text
    assert "-0.050" in text and "auroc_dao" in text and "3.500" in text
