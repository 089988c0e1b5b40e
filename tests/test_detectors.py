"""Reference sets (bank, global via faiss) against brute force; isolation forest, CLIPScore, cognitive
distillation and ABL on planted cases; the new detectors through extract/reduce on the smoke run."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score
from conftest import compose_cfg, run_cli
from test_knn import ALL, assert_close, brute_textbook

from clipbd import scoring
from clipbd.detectors import knn_scores
from clipbd.detectors.abl import LossRecorder, abl_scores, read_losses
from clipbd.detectors.clipscore import clip_scores
from clipbd.detectors.cognitive import CognitiveDistillation
from clipbd.detectors.iforest import iforest_scores
from clipbd.detectors.reference import (
    bank_scores,
    candidate_graph,
    default_nlist,
    draw_bank,
    feature_space,
    global_scores,
    neighbour_recall,
)
from clipbd.models.loss import clip_loss, clip_loss_per_sample
from clipbd.registry import ConfigError


def _pairs(n=90, d=6, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n, d))
    return img, img + 0.7 * rng.standard_normal((n, d))  # captions near their images


def _clustered(n, d, clusters, seed=0):
    rng = np.random.default_rng(seed)
    centres = 4 * rng.standard_normal((clusters, d))
    return (centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, d))).astype(np.float32)


# ----------------------------------------------------------------------------- bank


def test_bank_drawn_from_the_samples_matches_brute_force():
    img, _ = _pairs(100, 5)
    members = draw_bank(100, 40, np.random.default_rng(3))
    others = np.setdiff1d(np.arange(100), members)
    space, bank = feature_space(img, None, "image"), feature_space(img[members], None, "image")
    got = bank_scores(space, bank, k=6, methods=ALL, members=members)
    assert_close({m: s[members] for m, s in got.items()}, brute_textbook(img[members], k=6))
    assert_close({m: s[others] for m, s in got.items()}, brute_textbook(img[others], img[members], k=6))


def test_held_out_bank_with_image_and_caption_rows_matches_brute_force():
    img, txt = _pairs(50, 4)
    held_img, held_txt = _pairs(30, 4, seed=1)
    got = bank_scores(feature_space(img, txt, "image+text"), feature_space(held_img, held_txt, "image+text"),
                      k=5, methods=ALL)
    assert_close(got, brute_textbook(img, np.concatenate([held_img, held_txt]), k=5))
    members = np.arange(0, 50, 2)  # drawn from the samples: own image and own caption excluded
    got = bank_scores(feature_space(img, txt, "image+text"), feature_space(img[members], txt[members], "image+text"),
                      k=5, methods=ALL, members=members)
    ref = np.concatenate([img[members], txt[members]])
    assert_close({m: s[members] for m, s in got.items()}, brute_textbook(img[members], ref, k=5, offsets=[0, 25]))


def test_bank_too_small_for_k_is_a_clear_error():
    img, _ = _pairs(30, 3)
    with pytest.raises(ValueError, match=r"k=8 exceeds the 5 rows of the bank"):
        bank_scores(feature_space(img, None, "image"), feature_space(img[:6], None, "image"), k=8,
                    members=np.arange(6))


# ----------------------------------------------------------------------------- global


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_global_matches_brute_force(index):
    """IVF probing every list is exhaustive, so it must be exact too."""
    img, txt = _pairs(120, 6)
    kw = dict(index=index, nlist=3, nprobe=3)
    assert_close(global_scores(feature_space(img, None, "image"), k=7, methods=ALL, **kw), brute_textbook(img, k=7))
    got = global_scores(feature_space(img, txt, "image+text"), k=7, methods=ALL, **kw)
    assert_close(got, brute_textbook(img, np.concatenate([img, txt]), k=7, offsets=[0, 120]))
    got = global_scores(feature_space(img, txt, "text"), k=4, methods=ALL, **kw)
    assert_close(got, brute_textbook(txt, k=4))


def test_global_equals_knn_scores_with_duplicates_and_stays_finite():
    rng = np.random.default_rng(1)
    x = np.concatenate([np.repeat(rng.standard_normal((1, 6)), 20, axis=0), rng.standard_normal((60, 6))])
    got = global_scores(feature_space(x, None, "image"), k=5, methods=ALL, index="flat")
    want = knn_scores(x, k=5, methods=ALL)
    for m in ALL:
        assert np.isfinite(got[m]).all()
        np.testing.assert_allclose(got[m], want[m], rtol=1e-9, err_msg=m)


def test_ivf_recall_on_clustered_data_and_close_scores():
    x = _clustered(4000, 32, 40)
    nlist = default_nlist(len(x))
    graph = candidate_graph(x, 17, "ivf", nlist=nlist, nprobe=4, seed=0)
    recall = neighbour_recall(graph[1], x, np.arange(0, 4000, 10), 16)
    assert recall >= 0.95, recall
    approx = global_scores(feature_space(x, None, "image"), k=16, methods=("kdist", "dao"), graph=graph)
    exact = knn_scores(x, k=16, methods=("kdist", "dao"))
    assert np.mean(np.isclose(approx["kdist"], exact["kdist"], rtol=1e-9)) >= 0.8
    assert spearmanr(approx["dao"], exact["dao"]).statistic > 0.95  # DAO is heavy-tailed: ranks


def test_global_rejects_non_finite_and_too_large_k():
    x = _clustered(50, 4, 2)
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN/inf features in 1 row\(s\), e.g. rows \[3\]"):
        global_scores(feature_space(x, None, "image"), k=3, index="flat")
    with pytest.raises(ValueError, match="k=50 exceeds the 49 rows"):
        global_scores(feature_space(_clustered(50, 4, 2), None, "image"), k=50)


def test_faithful_with_bank_or_global_is_a_config_error(tmp_path):
    from clipbd.cli import normalize_overrides, one_line_composition_error
    from clipbd.registry import build_detectors

    cfg = compose_cfg(["scoring=global", "detector.dao.convention=faithful"], run_dir=tmp_path)
    with pytest.raises(ConfigError, match="detector.dao.convention=faithful .* scoring=global"):
        scoring.build_scoring(cfg).check(build_detectors(cfg))
    with pytest.raises(Exception) as err:  # an unknown mode fails at composition, naming the choices
        compose_cfg(["scoring=everything"], run_dir=tmp_path)
    line = one_line_composition_error(err.value)
    assert "scoring/everything" in line and all(m in line for m in ("batch", "bank", "global")), line
    # the key before `scoring` became a group still selects the mode on the command line
    assert normalize_overrides(["scoring.reference=bank", "scoring.bank_size=64"]) == ["scoring=bank", "scoring.bank_size=64"]


@pytest.mark.parametrize("overrides,values", [
    (["scoring.batch_size=10"], ("detector.dao.k=16", "scoring.batch_size=10")),
    (["scoring=bank", "scoring.bank_size=12"], ("detector.dao.k=16", "scoring.bank_size=12")),
    (["scoring.batch_size=16", "detector.dao.convention=faithful", "detector=[dao]"], ("detector.dao.k=16", "scoring.batch_size=16")),
])
def test_k_against_the_scoring_size_fails_before_any_stage(tmp_path, overrides, values):
    """k vs the scoring batch/bank is known from the config alone: run() refuses before the data
    stage writes anything, naming both values."""
    from clipbd.run import run

    cfg = compose_cfg(["+experiment=smoke", *overrides], run_dir=tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        run(cfg)
    assert all(v in str(err.value) for v in values), str(err.value)
    assert not (tmp_path / "run" / "data").exists() and not (tmp_path / "run" / "stages").exists()
    ok = compose_cfg(["+experiment=smoke", "scoring.batch_size=17"], run_dir=tmp_path / "ok")
    scoring.build_scoring(ok).check(__import__("clipbd.registry").registry.build_detectors(ok))  # k=16 < 17


# ----------------------------------------------------------------------------- other detectors


def test_isolation_forest_ranks_planted_outliers_first_and_is_seeded():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal((300, 8)), 6 + rng.standard_normal((4, 8))])
    s = iforest_scores(x, x, seed=1)
    assert set(np.argsort(-s)[:4]) == {300, 301, 302, 303}
    np.testing.assert_array_equal(s, iforest_scores(x, x, seed=1))
    assert not np.array_equal(s, iforest_scores(x, x, seed=2))


def test_clipscore_ranks_mismatched_pairs_first():
    img, txt = _pairs(200, 16)
    txt[:5] = -img[:5] + 0.1  # captions that disagree with their images
    s = clip_scores(img, txt)
    assert set(np.argsort(-s)[:5]) == set(range(5))
    np.testing.assert_allclose(s[5], -img[5] @ txt[5] / np.linalg.norm(img[5]) / np.linalg.norm(txt[5]))


class _PlantedEncoder(torch.nn.Module):
    """A stand-in image encoder with a planted backdoor: a white 3x3 corner patch switches the output
    to a fixed embedding (whatever the rest of the image), otherwise it is a projection of all pixels."""

    def __init__(self, size=12, dim=16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(3 * size * size, dim, generator=g) * (10 / size))
        self.target = torch.nn.Parameter(5 * torch.randn(dim, generator=g))

    def forward(self, x):
        gate = torch.sigmoid(200 * (x[:, :, :3, :3].mean((1, 2, 3)) - 0.95))[:, None]  # 1 if the patch is on
        return gate * self.target + (1 - gate) * (x.flatten(1) @ self.proj)


def test_cognitive_distillation_gives_triggered_images_the_highest_scores():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(10, 3, 12, 12, generator=g) * 0.8
    images[:3, :, :3, :3] = 1.0  # triggered
    enc = _PlantedEncoder().requires_grad_(False)
    s = CognitiveDistillation(steps=60).score_images(enc, images, torch.Generator().manual_seed(0))
    assert s.dtype == torch.float64 and ((s >= -1) & (s <= 0)).all()
    assert set(torch.argsort(-s)[:3].tolist()) == {0, 1, 2}, s


def test_abl_scores_lower_loss_higher_and_unseen_neutral():
    losses = np.array([[1.0, 2.0, np.nan, 4.0], [3.0, 2.0, np.nan, np.nan]])
    s, unseen = abl_scores(losses, [0, 1, 2, 3])
    np.testing.assert_allclose(s[[0, 1, 3]], [-2.0, -2.0, -4.0])
    assert unseen == 1 and s[2] == -2.0  # median of the others


def test_per_sample_loss_averages_to_the_clip_loss_and_is_recorded(tmp_path):
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(8, 4, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(8, 4, generator=g), dim=1)
    scale = torch.tensor(10.0)
    per = clip_loss_per_sample(img, txt, scale)
    torch.testing.assert_close(per.mean(), clip_loss(img, txt, scale))
    rec = LossRecorder(12)
    rec.add(torch.arange(8), per)
    rec.merge(lambda t: t)  # one process: nothing to sum
    rec.write(tmp_path, 1, "key")
    got = read_losses(tmp_path, 1)[0]
    np.testing.assert_allclose(got[:8], per.numpy(), rtol=1e-6)
    assert np.isnan(got[8:]).all()
    with pytest.raises(FileNotFoundError, match=r"abl \(epochs=2\) needs the per-sample losses"):
        read_losses(tmp_path, 2)


# ----------------------------------------------------------------------------- through the stages

NEW = ["iforest", "clipscore", "cd", "abl"]


@pytest.mark.slow
def test_smoke_run_records_per_sample_losses(smoke_run):
    run_dir = smoke_run[0]
    with h5py.File(run_dir / "sample_loss" / "epoch_0001.h5", "r") as f:
        loss, count = f["loss"][()], f["count"][()]
    assert loss.shape == (400,) and (count > 0).sum() >= 384  # 6 steps of 64, drop_last
    assert np.isfinite(loss[count > 0]).all() and np.isnan(loss[count == 0]).all()


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["batch", "global", "bank"])
def test_new_detectors_scored_and_reported(smoke_run, tmp_path, reference):
    run_dir = tmp_path / "copy"
    shutil.copytree(smoke_run[0], run_dir)
    names = ["dao", "slof", "kdist", "lid"] + NEW
    run_cli("+experiment=smoke", f"hydra.run.dir={run_dir}", "stages=[extract,reduce]", f"detector=[{','.join(names)}]",
            "detector.cd.steps=3", "detector.abl.epochs=1", f"scoring.reference={reference}", "scoring.bank_size=120")  # the old key, mapped by the CLI
    metrics = json.loads((run_dir / "metrics.json").read_text())
    with h5py.File(run_dir / "scores.h5", "r") as f:
        for d in names:
            assert 0.0 <= metrics[f"detect/{d}/auroc"] <= 1.0, d
            assert f[d].shape == (400,) and np.isfinite(f[d][()]).all(), d
            # the reported AUROC is the one of the stored scores against the plan's labels
            assert metrics[f"detect/{d}/auroc"] == pytest.approx(roc_auc_score(f["is_poison"][()], f[d][()]), abs=1e-12), d
        if reference != "batch":  # the in-batch scores of the same embeddings differ
            with h5py.File(smoke_run[0] / "scores.h5", "r") as g:
                assert not np.allclose(f["dao"][()], g["dao"][()])
    if reference == "global":
        emb = np.concatenate([h5py.File(p, "r")["image_emb"][()] for p in sorted((run_dir / "shards").glob("extract-*.h5"))])
        with h5py.File(run_dir / "scores.h5", "r") as f:
            np.testing.assert_allclose(f["kdist"][()], knn_scores(emb, k=16, methods=("kdist",))["kdist"], rtol=1e-9)
