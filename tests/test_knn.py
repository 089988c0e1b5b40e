"""knn_scores vs plain float64 brute force (both conventions), vs the literal published arithmetic,
and on planted outliers and degenerate inputs; plus the nn.Module face on a tiny OpenCLIP model."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch

import published_detectors as pub
from clipbd.detectors import knn_scores
from clipbd.detectors.knn import CONVENTIONS, DIST_FLOOR_REL, LID_MAX, exact_knn
from clipbd.detectors.module import DAODetector, KDistanceDetector, LIDDetector, SLOFDetector

ALL = ("kdist", "lid", "lid_mom", "slof", "dao")


# ----------------------------------------------------------------------------- brute force oracles


def _sorted_neighbours(D, i, skip):
    """Reference columns of row i of D ordered by (distance, index), skipping `skip`."""
    cols = [j for j in range(D.shape[1]) if j not in skip]
    order = sorted(cols, key=lambda j: (D[i, j], j))
    return order, [D[i, j] for j in order]


def brute_textbook(q, r=None, k=5, offsets=None, lid_est="mle", floor=0.0):
    """Textbook formulas, straight: r_i(p) = i-th nearest other reference point.
    floor > 0: the documented degenerate handling (distances clamped, LID capped, DAO saturating)."""
    in_batch = r is None
    r = q if in_batch else r
    Dq = np.sqrt(((q[:, None, :] - r[None, :, :]) ** 2).sum(-1))
    Dr = np.sqrt(((r[:, None, :] - r[None, :, :]) ** 2).sum(-1))
    offsets = [0] if in_batch else (offsets or [])

    def stats(dists):
        dists = [max(v, floor) for v in dists[:k]]
        rk = dists[k - 1]
        mean_log = sum(math.log(dists[i] / rk) for i in range(k)) / k
        lid = min(-1.0 / mean_log, LID_MAX) if mean_log < 0 else LID_MAX
        m = sum(dists) / k
        mom = min(m / (rk - m), LID_MAX) if rk > m else LID_MAX
        return rk, lid, mom

    def mean_pow(ratios, powers):  # (1/k) sum ratio^power, saturating at the largest float
        logs = [p * math.log(x) for x, p in zip(ratios, powers)]
        top = max(logs)
        log_mean = top + math.log(sum(math.exp(v - top) for v in logs) / len(logs))
        return math.exp(log_mean) if log_mean < math.log(np.finfo(np.float64).max) else np.finfo(np.float64).max

    ref_stats = []
    for o in range(r.shape[0]):
        _, dists = _sorted_neighbours(Dr, o, {o})
        ref_stats.append(stats(dists))
    out = {m: np.zeros(q.shape[0]) for m in ALL}
    for i in range(q.shape[0]):
        nbrs, dists = _sorted_neighbours(Dq, i, {off + i for off in offsets})
        rk, lid, mom = stats(dists)
        out["kdist"][i], out["lid"][i], out["lid_mom"][i] = rk, lid, mom
        nk = nbrs[:k]
        out["slof"][i] = np.mean([rk / ref_stats[o][0] for o in nk])
        if k > 1:
            lid_o = [ref_stats[o][1] if lid_est == "mle" else ref_stats[o][2] for o in nk]
            out["dao"][i] = mean_pow([rk / ref_stats[o][0] for o in nk], lid_o)
    return out


def brute_faithful(x, k=5, lid_est="mle"):
    """Published arithmetic written from its description: masked-row positions as sample indices."""
    n = x.shape[0]
    D = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))

    def lid_of(a):  # a: sorted distances, >= k+1 entries; published LID of columns 0..k-1 vs k
        if lid_est == "mle":
            return -k / sum(math.log(a[i] / a[k] + 1e-4) for i in range(k))
        m = sum(a[:k]) / k
        return m / (a[k] - m)

    full = [sorted(D[o]) for o in range(n)]  # self-distance 0 kept in column 0
    full_lid = [lid_of(a) for a in full]
    out = {m: np.zeros(n) for m in ALL}
    for i in range(n):
        masked = [D[i, j] for j in range(n) if j != i]  # positions p = 0..n-2
        order = sorted(range(n - 1), key=lambda p: (masked[p], p))
        a = [masked[p] for p in order]
        out["kdist"][i] = a[k]
        out["lid"][i] = -k / sum(math.log(a[j] / a[k] + 1e-4) for j in range(k))
        m = sum(a[:k]) / k
        out["lid_mom"][i] = m / (a[k] - m)
        pos = order[:k]  # used directly as sample indices
        out["slof"][i] = np.mean([a[k] / full[p][k] for p in pos])
        out["dao"][i] = np.mean([full_lid[p] * math.log(a[k] / full[p][k]) for p in pos])
    return out


def assert_close(got, want, rtol=1e-6, methods=ALL):
    for m in methods:
        np.testing.assert_allclose(got[m], want[m], rtol=rtol, atol=0, err_msg=m)


def _methods(k):
    return ("kdist", "slof") if k == 1 else ALL


# ----------------------------------------------------------------------------- vs brute force


@pytest.mark.parametrize("n,d,k", [(50, 3, 1), (80, 8, 5), (150, 32, 16), (300, 64, 5), (120, 3, 16)])
def test_textbook_matches_brute_force_in_batch(n, d, k):
    x = np.random.default_rng(n + d + k).standard_normal((n, d))
    got = knn_scores(x, k=k, methods=_methods(k))
    assert_close(got, brute_textbook(x, k=k), methods=_methods(k))


@pytest.mark.parametrize("n,m,d,k", [(40, 150, 8, 5), (60, 90, 33, 16), (25, 60, 3, 1)])
def test_textbook_matches_brute_force_with_reference(n, m, d, k):
    rng = np.random.default_rng(m)
    q, r = rng.standard_normal((n, d)) * 1.5, rng.standard_normal((m, d))
    got = knn_scores(q, r, k=k, methods=_methods(k))
    assert_close(got, brute_textbook(q, r, k=k), methods=_methods(k))


def test_textbook_self_offset_equals_in_batch_rows_and_brute_force():
    rng = np.random.default_rng(5)
    r = rng.standard_normal((200, 12))
    q = r[60:110]
    got = knn_scores(q, r, k=7, methods=ALL, self_offset=60)
    whole = knn_scores(r, k=7, methods=ALL)
    assert_close(got, {m: v[60:110] for m, v in whole.items()}, rtol=1e-12)
    # two excluded rows per query (its image and its caption): brute force with both skipped
    rt = np.concatenate([r, rng.standard_normal((200, 12)) + 0.5])
    got = knn_scores(q, rt, k=7, methods=ALL, self_offset=(60, 260))
    assert_close(got, brute_textbook(q, rt, k=7, offsets=[60, 260]))


def test_dao_mom_estimator_matches_brute_force():
    x = np.random.default_rng(11).standard_normal((90, 6))
    got = knn_scores(x, k=8, methods="dao", est_type="mom")
    np.testing.assert_allclose(got["dao"], brute_textbook(x, k=8, lid_est="mom")["dao"], rtol=1e-6)


@pytest.mark.parametrize("n,d,k", [(50, 3, 1), (90, 8, 5), (200, 64, 16)])
def test_faithful_matches_brute_force(n, d, k):
    x = np.random.default_rng(7 * n + d).standard_normal((n, d))
    got = knn_scores(x, k=k, methods=ALL, convention="faithful")
    assert_close(got, brute_faithful(x, k=k))
    got = knn_scores(x, k=k, methods="dao", convention="faithful", est_type="mom")
    np.testing.assert_allclose(got["dao"], brute_faithful(x, k=k, lid_est="mom")["dao"], rtol=1e-6)


def test_float32_input_agrees_with_float64_brute_force():
    x = np.random.default_rng(3).standard_normal((150, 48)).astype(np.float32)
    want = brute_textbook(x.astype(np.float64), k=10)
    assert_close(knn_scores(x, k=10, methods=ALL), want, rtol=1e-6)
    got = knn_scores(torch.from_numpy(x), k=10, methods=ALL, convention="faithful")
    assert_close(got, brute_faithful(x.astype(np.float64), k=10), rtol=1e-6)


def assert_exact_knn(x, k):
    dist, idx = exact_knn(x, k=k)
    D = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    for i in range(x.shape[0]):
        order, dists = _sorted_neighbours(D, i, {i})
        assert idx[i].tolist() == order[:k]
        np.testing.assert_allclose(dist[i].numpy(), dists[:k], rtol=1e-9)


def test_float32_resolution_is_not_enough_and_the_fallback_is_exact():
    """Tight clusters far from each other and from the origin: float32 products cannot rank the
    neighbours, the certificate fails and rows are re-ranked with more candidates / in full."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 16)) * 1e4
    x = centres[rng.integers(0, 4, 160)] + rng.standard_normal((160, 16)) * 1e-3
    assert_exact_knn(x, 6)
    assert_close(knn_scores(x, k=6, methods=ALL, chunk_size=17), brute_textbook(x, k=6), rtol=1e-6)
    one = rng.standard_normal((1, 16)) * 1e4 + rng.standard_normal((60, 16)) * 1e-3  # full rows
    assert_exact_knn(one, 6)
    assert_close(knn_scores(one, k=6, methods=ALL), brute_textbook(one, k=6), rtol=1e-6)
    # a cluster 1e-30 wide at the centre of a unit-wide set: its float32 products underflow to 0
    assert_exact_knn(np.concatenate([rng.standard_normal((40, 8)) * 1e-30, np.eye(8), -np.eye(8)]), 5)


def test_chunking_does_not_change_results():
    x = torch.randn(130, 20, generator=torch.Generator().manual_seed(1))
    a = knn_scores(x, k=9, methods=ALL)
    b = knn_scores(x, k=9, methods=ALL, chunk_size=7)
    assert_close(a, b, rtol=1e-12)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_symmetric_in_batch_product_equals_chunked_products(monkeypatch, convention):
    """In-batch scoring multiplies only the upper block triangle of X X^T; ragged blocks (130 rows in
    blocks of 17) and the float32 fallback rows give the same neighbours as the per-chunk products."""
    import clipbd.detectors.exact as engine

    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal((100, 20)), rng.standard_normal((30, 20)) * 1e-4 + 1e3])
    monkeypatch.setattr(engine, "_SYM_BLOCK", 17)
    sym = knn_scores(x, k=9, methods=ALL, convention=convention)
    monkeypatch.setattr(engine, "_SYM_BYTES", 0)  # too large: the chunked path
    chunked = knn_scores(x, k=9, methods=ALL, convention=convention)
    assert_close(sym, chunked, rtol=1e-12)
    if convention == "textbook":
        assert_close(sym, brute_textbook(x, k=9), rtol=1e-6)


# ----------------------------------------------------------------------------- vs published code


@pytest.mark.parametrize("k,est", [(1, "mle"), (5, "mle"), (16, "mle"), (16, "mom")])
def test_faithful_equals_published_arithmetic(k, est):
    x = torch.randn(160, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    got = knn_scores(x, k=k, methods=ALL, convention="faithful", est_type=est)
    np.testing.assert_allclose(got["kdist"], pub.kdistance(x, k).numpy(), rtol=1e-12)
    np.testing.assert_allclose(got["lid"], pub.lid(x, k).numpy(), rtol=1e-10)
    np.testing.assert_allclose(got["lid_mom"], pub.lid(x, k, est_type="mom").numpy(), rtol=1e-10)
    np.testing.assert_allclose(got["slof"], pub.slof(x, k).numpy(), rtol=1e-12)
    np.testing.assert_allclose(got["dao"], pub.dao(x, k, est_type=est).numpy(), rtol=1e-9, atol=1e-12)


def test_faithful_equals_published_gathered_and_image_text():
    g = torch.Generator().manual_seed(2)
    vref, tref = torch.randn(3 * 40, 16, generator=g), torch.randn(3 * 40, 16, generator=g) + 0.3
    v, t = vref[40:80], tref[40:80]  # rank 1 of 3
    got = knn_scores(v, vref, k=8, methods=ALL, convention="faithful", self_offset=40)
    for m in ("kdist", "lid", "slof", "dao"):
        want = pub.DETECTORS[m](v.double(), 8, reference=vref.double(), offset=40).numpy()
        np.testing.assert_allclose(got[m], want, rtol=1e-9, err_msg=m)
    ref = torch.cat([vref, tref])
    got = knn_scores(v, ref, k=8, methods=ALL, convention="faithful", self_offset=(40, 160))
    for m in ("kdist", "lid", "slof", "dao"):
        want = pub.DETECTORS[m](v.double(), 8, texts=t.double(), reference=vref.double(),
                                text_reference=tref.double(), offset=40).numpy()
        np.testing.assert_allclose(got[m], want, rtol=1e-9, err_msg=m)


def test_faithful_float32_close_to_published_float32():
    x = torch.randn(200, 32, generator=torch.Generator().manual_seed(4))
    got = knn_scores(x, k=16, methods=("slof", "dao"), convention="faithful")
    np.testing.assert_allclose(got["slof"], pub.slof(x, 16).numpy(), rtol=1e-5)
    np.testing.assert_allclose(got["dao"], pub.dao(x, 16).numpy(), rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------- interface


def test_torch_and_numpy_inputs_give_the_same_float64_scores():
    x = np.random.default_rng(9).standard_normal((70, 10)).astype(np.float32)
    a = knn_scores(x, k=5, methods=ALL)
    b = knn_scores(torch.from_numpy(x).requires_grad_(), k=5, methods=ALL)
    assert list(a) == list(ALL)
    for m in ALL:
        assert a[m].dtype == np.float64 and a[m].shape == (70,)
        np.testing.assert_array_equal(a[m], b[m])


@pytest.mark.parametrize("convention", ["textbook", "faithful"])
def test_planted_outliers_score_highest(convention):
    rng = np.random.default_rng(0)
    cloud = rng.standard_normal((400, 8))
    directions = np.linalg.qr(rng.standard_normal((8, 8)))[0][:5]  # orthonormal: far from each other
    x = np.concatenate([cloud, 8.0 * directions])  # rows 400..404
    got = knn_scores(x, k=16, methods=("kdist", "slof", "dao"), convention=convention)
    for m, s in got.items():
        assert set(np.argsort(-s)[:5]) == set(range(400, 405)), m


# ----------------------------------------------------------------------------- degenerate inputs


def test_k_too_large_and_bad_arguments_raise_clear_errors():
    x = np.random.default_rng(0).standard_normal((10, 4))
    with pytest.raises(ValueError, match=r"k=16 must be < batch size 10 \(self excluded\)"):
        knn_scores(x, k=16)
    with pytest.raises(ValueError, match=r"k=9 must be < batch size - 1 = 9"):
        knn_scores(x, k=9, convention="faithful")
    with pytest.raises(ValueError, match="k=11 needs 11 of the 10"):
        knn_scores(x, x, k=11, methods="kdist")
    with pytest.raises(ValueError, match="k=0"):
        knn_scores(x, k=0)
    with pytest.raises(ValueError, match="k=1: LID"):
        knn_scores(x, k=1, methods="dao")
    with pytest.raises(ValueError, match="methods="):
        knn_scores(x, k=2, methods=("lof",))
    with pytest.raises(ValueError, match="faithful"):
        knn_scores(x, x, k=2, convention="faithful")
    with pytest.raises(ValueError, match="self_offset=5"):
        knn_scores(x, x[:6], k=2, self_offset=5)
    with pytest.raises(ValueError, match="d=4 features but reference has d=3"):
        knn_scores(x, x[:, :3], k=2)
    with pytest.raises(ValueError, match="rescale the features"):
        knn_scores(x * 1e200, k=2)


def test_non_finite_features_are_rejected_naming_the_rows():
    x = np.random.default_rng(0).standard_normal((30, 4))
    x[7, 1], x[12, 0] = np.nan, np.inf
    with pytest.raises(ValueError, match=r"NaN/inf features in 2 row\(s\), e.g. rows \[7, 12\]"):
        knn_scores(x, k=3)


@pytest.mark.parametrize("convention", ["textbook", "faithful"])
def test_duplicates_give_finite_scores(convention):
    rng = np.random.default_rng(1)
    x = np.concatenate([np.repeat(rng.standard_normal((1, 6)), 20, axis=0),  # 20 identical rows
                        np.repeat(rng.standard_normal((1, 6)) + 3, 3, axis=0),  # a few pairs
                        rng.standard_normal((60, 6))])
    got = knn_scores(x, k=5, methods=ALL, convention=convention)
    for m, s in got.items():
        assert np.isfinite(s).all(), m
    if convention == "textbook":
        spread = math.sqrt(((x - x.mean(0)) ** 2).sum(1).mean())
        np.testing.assert_allclose(got["kdist"][:20], DIST_FLOOR_REL * spread)
        np.testing.assert_allclose(got["slof"][:20], 1.0)  # own cluster: ratio of equal floors
        np.testing.assert_allclose(got["dao"][:20], 1.0)
        assert (got["lid"][:20] == LID_MAX).all() and (got["lid_mom"][:20] == LID_MAX).all()
        # the documented handling, written plainly (clamp, cap, saturate), for every row
        assert_close(got, brute_textbook(x, k=5, floor=DIST_FLOOR_REL * spread))
    else:  # published nan_to_num: 0/0 -> 1000
        assert (got["lid"][:20] == 1000.0).all()


def test_all_identical_points_are_finite():
    x = np.ones((12, 3))
    for convention in ("textbook", "faithful"):
        got = knn_scores(x, k=3, methods=ALL, convention=convention)
        assert all(np.isfinite(s).all() for s in got.values())


def test_far_outlier_dao_saturates_instead_of_overflowing():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.standard_normal((100, 64)) * 0.01, np.full((1, 64), 1e6)])
    got = knn_scores(x, k=4, methods=("dao",))["dao"]
    assert np.isfinite(got).all() and got[-1] == got.max()


# ----------------------------------------------------------------------------- nn.Module face


@pytest.fixture(scope="module")
def tiny_clip():
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=1, head_width=32),
        text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=2, layers=1),
    )
    return model.eval()


def _batch(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(1, 49408, (n, 16), generator=g)


DETECTOR_METHODS = [(DAODetector, "dao"), (SLOFDetector, "slof"), (KDistanceDetector, "kdist"),
                    (LIDDetector, "lid")]


@pytest.mark.parametrize("cls,method", DETECTOR_METHODS)
def test_module_scores_raw_image_features(tiny_clip, cls, method):
    images, _ = _batch()
    out = cls(k=4)(model=tiny_clip, images=images)
    with torch.no_grad():
        feats = tiny_clip.encode_image(images)
    assert isinstance(out, torch.Tensor) and out.shape == (24,) and out.device == images.device
    np.testing.assert_allclose(out.numpy(), knn_scores(feats, k=4, methods=method)[method], rtol=1e-12)


@pytest.mark.parametrize("cls,method", DETECTOR_METHODS)
def test_module_faithful_with_texts_matches_published(tiny_clip, cls, method):
    images, texts = _batch()
    kwargs = {"est_type": "mle"} if cls in (DAODetector, LIDDetector) else {}
    out = cls(k=4, convention="faithful", **kwargs)(model=tiny_clip, images=images, texts=texts)
    with torch.no_grad():
        v, t = tiny_clip.encode_image(images).double(), tiny_clip.encode_text(texts).double()
    want = pub.DETECTORS[method](v, 4, texts=t)
    np.testing.assert_allclose(out.numpy(), want.numpy(), rtol=1e-9)


def test_module_with_texts_uses_images_and_captions_as_reference(tiny_clip):
    images, texts = _batch()
    out = DAODetector(k=4)(model=tiny_clip, images=images, texts=texts)
    with torch.no_grad():
        v, t = tiny_clip.encode_image(images), tiny_clip.encode_text(texts)
    want = knn_scores(v, torch.cat([v, t]), k=4, methods="dao", self_offset=(0, 24))["dao"]
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-12)
    caps = DAODetector(k=4, features="text")(model=tiny_clip, images=images, texts=texts)
    want = knn_scores(t, torch.cat([v, t]), k=4, methods="dao", self_offset=(0, 24))["dao"]
    np.testing.assert_allclose(caps.numpy(), want, rtol=1e-12)


def test_module_gather_distributed_excludes_this_ranks_rows(tiny_clip, monkeypatch):
    import clipbd

    images, texts = _batch(16, seed=1)
    other_images, other_texts = _batch(16, seed=2)
    with torch.no_grad():
        other = {"img": tiny_clip.encode_image(other_images), "txt": tiny_clip.encode_text(other_texts)}
        mine = {"img": tiny_clip.encode_image(images), "txt": tiny_clip.encode_text(texts)}

    def all_gather_cat(x):  # this process is rank 1 of 2; rank 0 holds `other`
        key = "img" if torch.allclose(x, mine["img"]) else "txt"
        return torch.cat([other[key], x])

    fake = types.SimpleNamespace(all_gather_cat=all_gather_cat, rank=lambda: 1, world=lambda: 2)
    monkeypatch.setitem(sys.modules, "clipbd.dist", fake)
    monkeypatch.setattr(clipbd, "dist", fake, raising=False)
    out = DAODetector(k=4, gather_distributed=True)(model=tiny_clip, images=images)
    ref = torch.cat([other["img"], mine["img"]])
    np.testing.assert_allclose(out.numpy(), knn_scores(ref, k=4, methods="dao")["dao"][16:], rtol=1e-12)
    out = SLOFDetector(k=4, gather_distributed=True, convention="faithful")(
        model=tiny_clip, images=images, texts=texts)
    want = pub.slof(mine["img"].double(), 4, texts=mine["txt"].double(), offset=16,
                    reference=ref.double(), text_reference=torch.cat([other["txt"], mine["txt"]]).double())
    np.testing.assert_allclose(out.numpy(), want.numpy(), rtol=1e-9)


def test_module_rejects_bad_configuration(tiny_clip):
    images, _ = _batch(8)
    with pytest.raises(ValueError, match="est_type"):
        DAODetector(est_type="median")
    with pytest.raises(ValueError, match="features"):
        DAODetector(features="audio")
    with pytest.raises(ValueError, match="texts"):
        DAODetector(k=2, features="text")(model=tiny_clip, images=images)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_also_with_tf32(monkeypatch):
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(6))
    want = knn_scores(x, k=8, methods=ALL)
    assert_close(knn_scores(x.cuda(), k=8, methods=ALL), want, rtol=1e-9)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)  # coarser selection product
    assert_close(knn_scores(x.cuda(), k=8, methods=ALL), want, rtol=1e-9)
