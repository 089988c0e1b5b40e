"""The analyses built on the decomposition (clipbd.inspect.ablation/heads/analysis) on a planted
backdoor: a synthetic decomposition where the trigger lives in one known place."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipbd.inspect.ablation import Parts, component_ablations, default_mlp_layers, mean_ablate, mlp_repair
from clipbd.inspect.analysis import analyse, flat_metrics, split_validation
from clipbd.inspect.heads import default_zeta, infected, prototypes, repair

L, H, D, C, TARGET = 3, 4, 16, 4, 2


def _world(n: int, seed: int, trigger: str | None = None):
    """Parts of n images with class evidence spread over every head and MLP, plus, when triggered,
    the target direction written into head (L-1, 1) ("head") or MLP L-1 ("mlp") instead of the
    head's usual term. Classes are the first C basis vectors."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (n,), generator=g)
    onehot = torch.nn.functional.one_hot(labels, D).float()
    heads = 0.05 * torch.randn(n, L, H, D, generator=g) + onehot[:, None, None] * 0.1
    heads[..., C] += 0.2  # a shared direction: every head's clean mean points along it
    mlps = 0.05 * torch.randn(n, L, D, generator=g) + onehot[:, None] * 0.1
    rest = 0.05 * torch.randn(n, D, generator=g)
    if trigger == "head":
        heads[:, L - 1, 1] = 0.0
        heads[:, L - 1, 1, TARGET] = 5.0
        heads[:, L - 1, 1, C] = -1.0  # off the head's clean direction, as an infected head is
    elif trigger == "mlp":
        mlps[:, L - 1, TARGET] += 5.0
    return Parts(heads, mlps, rest), labels.numpy()


CLASSES = torch.eye(D)[:C]


def test_split_is_seeded_disjoint_and_complete():
    a = split_validation(100, 0.2, np.random.default_rng(5))
    b = split_validation(100, 0.2, np.random.default_rng(5))
    assert np.array_equal(a[0], b[0]) and len(a[0]) == 20
    assert sorted(np.r_[a[0], a[1]].tolist()) == list(range(100))
    with pytest.raises(ValueError, match="val_fraction=1.0"):
        split_validation(10, 1.0, np.random.default_rng(0))


def test_mean_ablating_everything_leaves_rest_plus_means():
    parts, _ = _world(50, 0)
    for kind in ("attn", "mlp", "layer"):
        mean = parts.component(kind).mean(0)
        emb = mean_ablate(parts, kind, range(L), mean)
        other = parts.total() - parts.component(kind).sum(1)
        assert torch.allclose(emb, other + mean.sum(0), atol=1e-5)


def test_head_trigger_is_found_in_the_last_layer_and_repaired():
    val, _ = _world(200, 0)
    clean, labels = _world(400, 1)
    bd, _ = _world(400, 1, trigger="head")
    r = analyse(val, clean, bd, CLASSES, labels, TARGET, head_layers=1, eps=0.0)
    assert r["baseline"]["asr"] == 1.0 and r["baseline"]["clean_acc"] > 0.9
    abl = r["ablations"]["attn"]
    assert abl["single"][L - 1]["asr"] < 0.05 and abl["single"][0]["asr"] == 1.0
    share = np.asarray(r["heads"]["share"]["triggered_published"])
    assert share[L - 1, 1] == 1.0 and share[L - 1, [0, 2, 3]].max() < 0.05
    rep = r["heads"]["rep"]["published"]
    assert rep["asr"] < 0.05 and abs(rep["clean_acc"] - r["baseline"]["clean_acc"]) < 0.05
    assert r["heads"]["det"]["count"]["auroc"] > 0.95 and r["heads"]["det"]["continuous"]["auroc"] > 0.95
    assert r["mlp_repair"]["asr"] == 1.0  # the MLPs are not where this trigger lives
    m = flat_metrics(r)
    assert m["inspect/decomp/rep/published/asr"] == rep["asr"]
    assert f"inspect/decomp/ablate/attn/accumulated/0-{L - 1}/asr" in m


def test_mlp_trigger_is_repaired_by_mlp_ablation_not_heads():
    val, _ = _world(200, 0)
    clean, labels = _world(400, 1)
    bd, _ = _world(400, 1, trigger="mlp")
    r = analyse(val, clean, bd, CLASSES, labels, TARGET, mlp_layers=[L - 1])
    assert r["heads"]["rep"]["published"]["asr"] == 1.0
    assert r["mlp_repair"]["asr"] < 0.05
    assert r["ablations"]["mlp"]["accumulated"][0]["layers"] == [L - 1]


def test_repair_with_every_head_masked_uses_the_prototypes():
    val, _ = _world(100, 0)
    parts, _ = _world(10, 3)
    proto = prototypes(val)
    emb = repair(parts, torch.ones(10, L, H, dtype=torch.bool), proto)
    assert torch.allclose(emb, parts.mlps.sum(1) + parts.rest + proto.sum((0, 1)), atol=1e-5)
    assert torch.equal(repair(parts, torch.zeros(10, L, H, dtype=torch.bool), proto), parts.total())


def test_published_and_normalised_scores():
    val, _ = _world(100, 0)
    parts, _ = _world(10, 3)
    proto = prototypes(val)
    flipped = Parts(-parts.heads, parts.mlps, parts.rest)
    assert not infected(parts, proto)["published"].any()
    assert infected(flipped, proto)["published"].all() and infected(flipped, proto)["normalised"].all()
    small = Parts(1e-3 * parts.heads, parts.mlps, parts.rest)  # the scale moves the dot, not the cosine
    assert infected(small, proto)["published"].all() and not infected(small, proto)["normalised"].any()


def test_defaults_scale_the_published_settings():
    assert default_zeta(12) == 5 and default_zeta(4) == 2
    assert default_mlp_layers(12) == [7, 8, 9, 10, 11] and default_mlp_layers(4) == [2, 3]
    assert default_mlp_layers(1) == [0]
    val, _ = _world(20, 0)
    with pytest.raises(ValueError, match="mlp_layers"):
        mlp_repair(val, val, val, CLASSES, np.zeros(20, dtype=int) + 1, TARGET, layers=[5])
    out = component_ablations(val, val, val, CLASSES, np.ones(20, dtype=int), TARGET)
    assert [s["layers"] for s in out["layer"]["accumulated"]] == [[2], [1, 2], [0, 1, 2]]


def test_textspan_names_the_direction_a_head_varies_along():
    from clipbd.inspect.textspan import textspan

    g = torch.Generator().manual_seed(0)
    texts = [f"t{i}" for i in range(6)]
    emb = torch.nn.functional.normalize(torch.randn(6, D, generator=g), dim=-1)
    coef = torch.randn(300, 2, generator=g) * torch.tensor([3.0, 1.0])
    terms = coef @ emb[[4, 1]] + 0.01 * torch.randn(300, D, generator=g)  # mostly t4, then t1
    names = textspan(terms, emb, texts, iters=2, rank=4)
    assert [n["text"] for n in names] == ["t4", "t1"]
    assert names[0]["variance"] > names[1]["variance"] > 0.01 and sum(n["variance"] for n in names) <= 1 + 1e-9
