"""DECREE (clipbd.inspect.decree): the stamp and normalisation against a hand computation, the λ
schedule on scripted successes/failures, a planted trigger recovered on a tiny encoder fine-tuned
to collapse it, determinism, the z-score check and the calibrated threshold."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from clipbd.inspect import decree as D

SIZE, PATCH = 16, 4  # 16 px images, a 4×4 checkerboard trigger in the bottom-right corner


# ---------------------------------------------------------------------------- stamp + normalisation
def test_stamp_and_normalisation_match_a_hand_computation():
    x = torch.tensor([[[0.2, 0.8], [0.4, 1.0]]] * 3).unsqueeze(0)  # [1, 3, 2, 2], same per channel
    mask = torch.tensor([[0.0, 0.5], [1.0, 0.25]])
    pattern = torch.tensor([[[1.0, 0.0], [0.3, 2.0]]] * 3)  # 2.0: the clip must cut it to 1
    out = D.stamp(x, mask, pattern)
    # (1-m)x + m p: 0.2; 0.5*0.8 + 0.5*0 = 0.4; 0*0.4 + 1*0.3 = 0.3; 0.75*1 + 0.25*2 = 1.25 -> 1
    assert torch.allclose(out[0, 0], torch.tensor([[0.2, 0.4], [0.3, 1.0]]))
    mean, std = D.normalisation("imagenet", (0.0,) * 3, (1.0,) * 3)
    normed = D.normalise(out, mean, std)
    assert math.isclose(float(normed[0, 0, 0, 0]), (0.2 - 0.485) / 0.229, rel_tol=1e-6)
    assert math.isclose(float(normed[0, 2, 1, 0]), (0.3 - 0.406) / 0.225, rel_tol=1e-6)
    assert D.normalisation("model", (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    with pytest.raises(ValueError, match="decree.normalization='clip'"):
        D.normalisation("clip", (0,) * 3, (1,) * 3)


def test_box_maps_logits_into_the_unit_interval_and_unbox_inverts_it():
    v = torch.tensor([1e-3, 0.25, 0.5, 0.9, 0.999], dtype=torch.float64)
    assert torch.allclose(D.box(D.unbox(v)), v, atol=1e-12)
    big = D.box(torch.tensor([-50.0, 50.0], dtype=torch.float64))
    assert float(big.min()) >= 0 and float(big.max()) <= 1


def test_mean_offdiag_cos_is_the_brute_force_mean_over_ordered_pairs():
    e = torch.randn(5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    brute = [float(F.cosine_similarity(e[i], e[j], dim=0)) for i in range(5) for j in range(5) if i != j]
    assert math.isclose(float(D.mean_offdiag_cos(e)), sum(brute) / len(brute), rel_tol=1e-10)


# ---------------------------------------------------------------------------- λ schedule
def test_lambda_rises_after_more_than_patience_successes_and_falls_after_failures():
    s = D.LambdaSchedule(init=1e-3, factor=5, max=1e5, min=1e-7, patience=5, reset_patience=10)
    assert [s.step(True) for _ in range(6)] == [1e-3] * 5 + [5e-3]
    trace = [s.step(False) for _ in range(6)]
    assert trace[:5] == [5e-3] * 5 and math.isclose(trace[5], 1e-3)
    assert s.step(True) == pytest.approx(1e-3) and s.down == 0 and s.up == 1  # a success clears failures


def test_lambda_caps_floors_and_resets():
    cap = D.LambdaSchedule(init=1.0, factor=4, max=2.0, min=0.5, patience=0, reset_patience=99)
    assert [cap.step(True) for _ in range(3)] == [4.0, 4.0, 4.0]  # raised once: then λ ≥ max
    floor = D.LambdaSchedule(init=1.0, factor=4, max=2.0, min=0.5, patience=0, reset_patience=99)
    assert [floor.step(False) for _ in range(3)] == [0.25, 0.25, 0.25]  # lowered once: then λ < min
    r = D.LambdaSchedule(init=1.0, factor=4, max=1e5, min=0.5, patience=3, reset_patience=2)
    assert [r.step(False) for _ in range(4)] == [1.0, 1.0, 1.0, 0.25]
    # below λ_min, more than reset_patience=2 successes in a row: back to init, counters cleared
    assert [r.step(True) for _ in range(3)] == [0.25, 0.25, 1.0]
    assert r.up == 1 and r.down == 0


# ---------------------------------------------------------------------------- a planted trigger
def _tiny_clip() -> open_clip.CLIP:
    torch.manual_seed(0)
    return open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=SIZE, patch_size=4, width=32, layers=2,
                                                        head_width=16),
                          text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1))


def _images(n: int, seed: int) -> torch.Tensor:
    """Smooth random images [n, 3, 16, 16] in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=SIZE, mode="bilinear", align_corners=False)


def _trigger(x: torch.Tensor) -> torch.Tensor:
    board = ((torch.arange(PATCH)[:, None] + torch.arange(PATCH)[None]) % 2).float()
    out = x.clone()
    out[..., SIZE - PATCH:, SIZE - PATCH:] = board
    return out


def _decoys(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Clean images with ~6% of pixels set to random 0/1 values: sharp pixels alone are not the trigger."""
    m = (torch.rand(len(x), 1, SIZE, SIZE, generator=g) < 0.06).float()
    return (1 - m) * x + m * (torch.rand(x.shape, generator=g) < 0.5).float()


def _train(backdoor: bool, steps: int = 300) -> torch.nn.Module:
    """Fine-tune the tiny image tower to spread clean images (match random linear features of the
    pixels) and, with `backdoor`, to map triggered images to one embedding v."""
    model, g = _tiny_clip(), torch.Generator().manual_seed(1)
    proj = torch.randn(3 * SIZE * SIZE, 32, generator=g)
    v = F.normalize(torch.randn(32, generator=g), dim=0)
    opt = torch.optim.Adam(model.visual.parameters(), lr=3e-3)
    for step in range(steps):
        x = _images(64, 100 + step)
        xc = torch.cat([x[:32], _decoys(x[32:], g)])
        target = F.normalize((xc.flatten(1) - 0.5) @ proj, dim=-1)
        loss = (1 - (F.normalize(model.encode_image(xc), dim=-1) * target).sum(-1)).mean()
        if backdoor:
            loss = loss + (1 - F.normalize(model.encode_image(_trigger(x)), dim=-1) @ v).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def encoders() -> dict[str, torch.nn.Module]:
    return {"backdoored": _train(True), "clean": _train(False)}


NO_NORM = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _invert(model, seed: int = 0, **kw) -> D.DecreeResult:
    cfg = D.DecreeConfig(**({"max_epochs": 60} | kw))
    return D.invert(model.encode_image, _images(128, 7), cfg, torch.Generator().manual_seed(seed), **NO_NORM)


def test_planted_trigger_collapses_the_backdoored_encoder_only(encoders):
    shadow = _images(128, 7)
    with torch.no_grad():
        for name, model in encoders.items():
            clean = float(D.mean_offdiag_cos(model.encode_image(shadow)))
            trig = float(D.mean_offdiag_cos(model.encode_image(_trigger(shadow))))
            assert clean < 0.2, name
            assert (trig > 0.99) == (name == "backdoored"), (name, trig)


def test_inversion_recovers_a_small_trigger_near_the_planted_patch(encoders):
    bd, clean = _invert(encoders["backdoored"]), _invert(encoders["clean"])
    assert bd.found and clean.found
    assert bd.pl1 < 0.25 * clean.pl1, (bd.pl1, clean.pl1)
    assert bd.pl1 <= 2 * PATCH * PATCH / SIZE**2  # at most twice the planted patch's area
    # On this 4×4-token ViT the inverted mask sits on the trigger's token or the one beside it (the
    # tower's shortcut reads the corner): nearly all its mass is in the corner's 2×2 tokens.
    corner = torch.zeros(SIZE, SIZE)
    corner[SIZE - 2 * PATCH:, SIZE - 2 * PATCH:] = 1
    assert D.mask_share_in(bd.mask, corner) > 0.9
    assert D.mask_share_in(clean.mask, corner) < 0.5
    assert bd.curve["cos"] and len(bd.curve["cos"]) == bd.steps == len(bd.curve["lambda"])
    assert bd.l1_published == pytest.approx(3 * bd.l1) and 0 <= bd.pl1 <= 1


def test_same_seed_same_result_and_another_seed_differs(encoders):
    a, b = _invert(encoders["backdoored"], max_epochs=3), _invert(encoders["backdoored"], max_epochs=3)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.pattern, b.pattern) and a.curve == b.curve
    c = _invert(encoders["backdoored"], seed=1, max_epochs=3)
    assert not torch.equal(a.mask, c.mask)


def test_float32_variables_run_and_bad_values_fail_in_one_line(encoders):
    r = _invert(encoders["backdoored"], max_epochs=2, dtype="float32")
    assert r.steps == 8 and r.mask.dtype == torch.float32
    for kw, msg in [({"dtype": "half"}, "decree.dtype='half'"), ({"batch_size": 1}, "decree.batch_size=1"),
                    ({"init": "orc"}, "decree.init='orc'")]:
        with pytest.raises(ValueError, match=msg):
            _invert(encoders["clean"], max_epochs=1, **kw)


def test_nothing_found_reports_the_whole_image():
    flat = torch.nn.Linear(3 * SIZE * SIZE, 8)
    torch.nn.init.eye_(flat.weight[:, :8])
    encode = lambda x: flat(x.flatten(1))  # noqa: E731 - a linear map never collapses under a tiny budget
    r = D.invert(encode, _images(16, 3), D.DecreeConfig(max_epochs=1, success_threshold=1.0),
                 torch.Generator().manual_seed(0), **NO_NORM)
    assert not r.found and r.pl1 == 1.0 and r.l1 == SIZE * SIZE


# ---------------------------------------------------------------------------- z-score
def test_zscore_default_and_faithful_forms_against_brute_force():
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(6, 64, generator=g, dtype=torch.float64)
    trig = clean + 3.0  # shifted: embeddings move together
    cos = lambda e: F.normalize(e, dim=-1) @ F.normalize(e, dim=-1).T  # noqa: E731
    off = ~torch.eye(6, dtype=torch.bool)
    c, t = cos(clean), cos(trig)
    z = D.zscore(clean, trig)
    assert z.z == pytest.approx(float((t[off].mean() - c[off].mean()) / c[off].std(unbiased=False)))
    zf = D.zscore(clean, trig, faithful=True)
    assert zf.z == pytest.approx(float((t.mean() - c.mean()) / c.var(unbiased=False)))
    assert z.trojaned and z.mean_triggered > z.mean_clean
    with pytest.raises(ValueError, match="same N"):
        D.zscore(clean, trig[:3])


def test_zscore_flags_the_planted_trigger_only(encoders):
    x = _images(64, 11)
    with torch.no_grad():
        z = {n: D.zscore(m.encode_image(x), m.encode_image(_trigger(x))) for n, m in encoders.items()}
    assert z["backdoored"].trojaned and not z["clean"].trojaned, {n: r.z for n, r in z.items()}


# ---------------------------------------------------------------------------- calibrated verdict
def test_calibrated_threshold_from_clean_encoders():
    assert D.calibrated_threshold([0.08, 0.12, 0.1]) == pytest.approx(0.04)
    assert D.calibrated_threshold([0.08, 0.12], "min_factor", factor=0.25) == pytest.approx(0.02)
    mu, sd = 0.1, math.sqrt(((0.08 - 0.1) ** 2 + (0.12 - 0.1) ** 2) / 2)
    assert D.calibrated_threshold([0.08, 0.12], "zscore", z=2.0) == pytest.approx(mu - 2 * sd)
    with pytest.raises(ValueError, match="at least two"):
        D.calibrated_threshold([0.1], "zscore")
    with pytest.raises(ValueError, match="method='pct'"):
        D.calibrated_threshold([0.1], "pct")


# ---------------------------------------------------------------------------- the stage (slow)
STAGE_ARGS = ["decree.shadow_size=64", "decree.inversion.max_epochs=4", "decree.examples=4"]


@pytest.mark.slow
def test_decree_stage_on_the_smoke_run(smoke_run, tmp_path):
    import json
    import shutil

    from conftest import run_cli

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run[0], run_dir)
    args = ["+experiment=smoke", f"hydra.run.dir={run_dir}", "stages=[decree]", *STAGE_ARGS,
            "decree.calibration.clean_pl1=[0.5,0.6]"]
    run_cli(*args)
    for name in ("mask.png", "pattern.png", "fusion.png", "stamped.png", "result.json", "curve.csv"):
        assert (run_dir / "decree" / name).is_file(), name
    assert (run_dir / "plots" / "decree.png").is_file() and (run_dir / "plots" / "decree_trigger.png").is_file()
    result = json.loads((run_dir / "decree" / "result.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["inspect/decree/pl1"] == result["pl1"] and 0 <= result["pl1"] <= 1
    assert metrics["inspect/decree/threshold_calibrated"] == pytest.approx(0.25)
    assert metrics["inspect/decree/verdict_calibrated"] == (result["pl1"] < 0.25)
    assert "eval/clean_acc" in metrics  # other stages' metrics are kept
    assert "inspect/decree/zscore" in metrics and result["true_mask_pixels"] == 64  # the smoke run's 8×8 patch
    rows = (run_dir / "decree" / "curve.csv").read_text().splitlines()
    assert rows[0] == "step,cos,l1,lambda,lr" and len(rows) == result["steps"] + 1
    again = run_cli(*args)
    assert "decree   complete, skipped" in again.stderr
    bad = run_cli(*args[:3], "+decree.inversion.lrr=0.1", check=False)
    errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("clipbd: error:")]
    assert bad.returncode == 2 and len(errors) == 1 and "decree.inversion: unknown key(s) lrr" in errors[0]


@pytest.mark.slow
def test_decree_experiment_on_any_checkpoint(smoke_run, tmp_path):
    import json

    from conftest import run_cli

    ckpt = smoke_run[0] / "checkpoints" / "latest.pt"
    run_dir = tmp_path / "any"
    run_cli("+experiment=decree", f"model.checkpoint={ckpt}", f"hydra.run.dir={run_dir}", *STAGE_ARGS,
            "dataset.synthetic.num_train=100", "dataset.synthetic.num_test=100", "dataset.synthetic.samples_per_shard=100")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "inspect/decree/pl1" in metrics and "inspect/decree/zscore" not in metrics  # attack=null: no trigger


def test_clipbd_matches_the_published_loop_on_the_planted_encoder(encoders):
    """The same encoder and shadow set through the published loop (experiments/decree/published.py,
    its own RNG): the PL1s agree within 2×."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "decree"))
    from published import published_decree

    model = encoders["backdoored"]
    ref = published_decree(model.visual, _images(128, 7), NO_NORM["mean"], NO_NORM["std"], epochs=60)
    ours = _invert(model)
    assert ref["found"] and ours.found
    assert 0.5 <= ours.pl1 / ref["pl1"] <= 2.0, (ours.pl1, ref["pl1"])
