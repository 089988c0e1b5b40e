"""BadNets and poison plans: deterministic per seed, triggers in range, plan fields as the ICLR code."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import compose_cfg

from clipbd.attacks.badnets import BadNets
from clipbd.attacks.plan import PoisonLookup, choose_indices
from clipbd.utils import rng

POOL = [f"a photo of a banana {i}" for i in range(20)]


def test_plan_is_deterministic_per_seed_and_differs_across_seeds():
    a = BadNets(poison_rate=0.01, patch_size=8)
    p1 = a.plan(10_000, rng(0, "poison"), POOL)
    p2 = a.plan(10_000, rng(0, "poison"), POOL)
    p3 = a.plan(10_000, rng(1, "poison"), POOL)
    assert json.dumps(p1) == json.dumps(p2)
    assert p1["poison_indices"] != p3["poison_indices"]
    assert p1["poison_count"] == 100 == len(set(p1["poison_indices"]))


def test_plan_uses_the_published_field_names():
    p = BadNets(poison_rate=0.001).plan(5000, rng(0, "poison"), POOL)
    for field in ("poison_indices", "poison_rate", "poison_text", "trigger_position", "backdoor_label"):
        assert field in p
    assert len(p["poison_text"]) == len(p["trigger_position"]) == len(p["poison_indices"]) == 5
    assert all(t in POOL for t in p["poison_text"])


def test_choose_indices_bounds():
    g = np.random.default_rng(0)
    assert len(choose_indices(10, 0.0, g)) == 0
    assert len(choose_indices(10_000, 0.0001, g)) == 1
    with pytest.raises(ValueError, match="poison_rate"):
        choose_indices(10, 1.5, g)


@pytest.mark.parametrize("pos", [(0, 0), (1, 1), (0.37, 0.81)])
def test_stamp_keeps_shape_and_range_and_writes_only_the_patch(pos):
    a = BadNets(patch_size=8, grid=4)
    img = torch.rand(3, 32, 32)
    out = a.stamp(img, pos)
    assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1
    changed = (out != img).any(0)
    ys, xs = torch.nonzero(changed, as_tuple=True)
    assert ys.max() - ys.min() < 8 and xs.max() - xs.min() < 8
    x0, y0 = round(pos[0] * 24), round(pos[1] * 24)
    assert torch.equal(out[0, y0:y0 + 8, x0:x0 + 8], a.pattern())
    assert torch.equal(img, out) is False and torch.equal(img[:, :y0], out[:, :y0])


def test_pattern_is_a_checkerboard():
    p = BadNets(patch_size=8, grid=4).pattern()
    assert p.shape == (8, 8) and set(p.unique().tolist()) == {0.0, 1.0}
    assert p[0, 0] != p[0, 2] and p[0, 0] == p[2, 2]


def test_bad_patch_size_is_named():
    with pytest.raises(ValueError, match="patch_size=7"):
        BadNets(patch_size=7, grid=4)
    with pytest.raises(ValueError, match="larger than"):
        BadNets(patch_size=64, grid=4).stamp(torch.rand(3, 32, 32), (0, 0))


def test_lookup_and_labels():
    plan = BadNets(poison_rate=0.05).plan(100, rng(3, "poison"), POOL)
    lk = PoisonLookup(plan)
    y = lk.labels(100)
    assert y.sum() == 5 and set(np.nonzero(y)[0]) == set(plan["poison_indices"])
    i = plan["poison_indices"][2]
    assert lk.get(i)["poison_text"] == plan["poison_text"][2]
    assert lk.get(next(j for j in range(100) if j not in plan["poison_indices"])) is None


def test_config_attack_builds(tmp_path):
    from clipbd.registry import build_attack

    assert isinstance(build_attack(compose_cfg([], run_dir=tmp_path)), BadNets)
    assert build_attack(compose_cfg(["attack=none"], run_dir=tmp_path)) is None
