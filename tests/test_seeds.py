"""The default as a distribution over seeds (issue 18): what `seed` varies, the seeds experiment,
the scoring regime's k, and the spread collector."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONF, ROOT, compose_cfg

NEIGHBOURHOOD = ("dao", "slof", "kdist", "lid")


@pytest.mark.parametrize("seed", [0, 1, 4])
def test_seed_draws_a_new_world_too(seed):
    cfg = compose_cfg([f"seed={seed}"])
    assert cfg.dataset.synthetic.seed == 1234 + seed  # seed 0 keeps the world of earlier releases
    pinned = compose_cfg([f"seed={seed}", "dataset.synthetic.seed=1234"])
    assert pinned.dataset.synthetic.seed == 1234


def test_seeds_experiment_sweeps_five_seeds():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=seeds"], return_hydra_config=True)
    assert [int(s) for s in str(cfg.hydra.sweeper.params.seed).split(",")] == [0, 1, 2, 3, 4]
    assert cfg.name == "seeds"


def test_the_tiny_default_decays_late_and_the_cc3m_recipe_stays_cosine():
    # wsd: the seeds that start learning shapes late are not cut off by a cosine tail (issue 18)
    assert compose_cfg([]).train.schedule == "wsd"
    assert compose_cfg(["+experiment=seeds"]).train.schedule == "wsd"
    assert compose_cfg(["+experiment=cc3m_badnet_dao"]).train.schedule == "cosine"


STEPS = lambda c: c.dataset.synthetic.num_train // c.train.batch_size * c.train.epochs  # noqa: E731
SESSION16 = {"num_train": 10000, "num_test": 2000, "class_weights": [1.0] * 7 + [0.08], "patch_size": 4, "epochs": 18, "k": 128}


def _settings(cfg) -> dict:
    return {"num_train": cfg.dataset.synthetic.num_train, "num_test": cfg.dataset.synthetic.num_test, "class_weights": [float(w) for w in cfg.dataset.synthetic.world.class_weights],
            "patch_size": cfg.model.arch.vision_cfg.patch_size, "epochs": cfg.train.epochs, "k": cfg.scoring.k}


def test_the_default_is_the_uniform_world_of_20k_images_with_8px_patches():
    # session 17 (issue 18): the clean reference holds still on this world, in the time of the old default
    default = compose_cfg()
    assert _settings(default) == {"num_train": 20000, "num_test": 10000, "class_weights": [1.0] * 8, "patch_size": 8,
                                  "epochs": 21, "k": 256}
    assert STEPS(default) == 312 * 21 == 6552
    assert (default.train.schedule, default.train.decay_fraction, default.train.ema_decay) == ("wsd", 0.2, None)
    assert default.attack.poison_rate == 0.05 and default.attack.patch_size == 8
    assert compose_cfg(["+experiment=seeds"]).scoring.k == 256


def test_the_session18_preset_is_the_default_at_18_epochs():
    # session 19 moved the default to 21 epochs; sessions 17-18's figures were measured at 18
    old, default = compose_cfg(["+preset=session18"]), compose_cfg()
    assert STEPS(old) == 312 * 18 == 5616
    old.train.epochs = default.train.epochs
    assert OmegaConf.to_container(old) == OmegaConf.to_container(default)


@pytest.mark.parametrize("experiment", ["natural", "smoke", "data20k", "uniform", "uniform_20k", "encoder_badencoder",
                                        "encoder_text_target", "attacks/blend", "attacks/badnets", "attacks/multi"])
def test_experiments_recorded_on_the_session16_default_pin_it(experiment):
    # their recorded results (experiments/*/README.md) were measured on it; their own keys still win
    cfg = compose_cfg([f"+experiment={experiment}"])
    own = yaml.safe_load((CONF / "experiment" / f"{experiment}.yaml").read_text())
    expected = dict(SESSION16)
    for key in ("num_train", "num_test"):
        expected[key] = (own.get("dataset") or {}).get("synthetic", {}).get(key, expected[key])
    expected["epochs"] = (own.get("train") or {}).get("epochs", expected["epochs"])
    expected["k"] = (own.get("scoring") or {}).get("k", expected["k"])
    weights = ((own.get("dataset") or {}).get("synthetic", {}).get("world") or {}).get("class_weights", expected["class_weights"])
    expected["class_weights"] = [float(w) for w in weights]
    assert _settings(cfg) == expected
    assert _settings(compose_cfg(["+preset=session16"])) == SESSION16


def test_data20k_keeps_session16s_steps_with_twice_the_images():
    old, big = compose_cfg(["+preset=session16"]), compose_cfg(["+experiment=data20k"])
    assert big.dataset.synthetic.num_train == 2 * old.dataset.synthetic.num_train
    assert STEPS(big) == STEPS(old) == 2808  # 312 x 9 = 156 x 18 (the last partial batch is dropped)
    assert (big.train.warmup_steps, big.train.schedule, big.train.lr) == (old.train.warmup_steps, "wsd", old.train.lr)
    assert big.scoring.k == old.scoring.k and big.attack.poison_rate == old.attack.poison_rate


def test_uniform_20k_is_the_uniform_world_with_a_third_more_steps():
    old, uniform, cand = compose_cfg(["+preset=session16"]), compose_cfg(["+experiment=uniform"]), compose_cfg(["+experiment=uniform_20k"])
    assert STEPS(cand) == 312 * 12 == 3744 and STEPS(old) == 2808
    assert list(cand.dataset.synthetic.world.class_weights) == list(uniform.dataset.synthetic.world.class_weights)
    assert cand.scoring.k == uniform.scoring.k == 256
    assert (cand.train.schedule, cand.train.decay_fraction, cand.train.ema_decay) == ("wsd", 0.2, None)
    assert cand.attack.poison_rate == old.attack.poison_rate


def test_detectors_take_the_scoring_regimes_k():
    default = compose_cfg()
    assert (default.scoring.batch_size, default.scoring.k) == (1024, 256)
    assert {default.detector[d].k for d in NEIGHBOURHOOD} == {256}
    # the paper's k for real data at paper rates, and a small k for the smoke run's 100-batches
    for exp, k in (("cc3m_badnet_dao", 16), ("scan", 16), ("smoke", 16)):
        cfg = compose_cfg([f"+experiment={exp}"])
        assert cfg.scoring.k == k, exp
    # session 16's rare world: k past the poisons of a 1024-batch
    old = compose_cfg(["+preset=session16"])
    assert {old.detector[d].k for d in NEIGHBOURHOOD} == {128}
    one = compose_cfg(["detector.dao.k=32"])
    assert one.detector.dao.k == 32 and one.detector.slof.k == 256


def _run(tmp_path, name, attack, seed, threads, values, schedule=None, weights=(1,) * 7 + (0.08,), data=None,
         patch=None, num_test=None):
    run = tmp_path / name
    run.mkdir()
    cfg = {"seed": seed, "attack": {"_target_": f"clipbd.attacks.{attack}.BadNets"} if attack else None,
           "dataset": {"synthetic": {"seed": 1234 + seed, "world": {"class_weights": list(weights) if weights else None}}}}
    if schedule:  # runs from before train.schedule have none: cosine; "wsd/0.4+ema0.999": decay and average
        name, _, ema = schedule.partition("+ema")
        name, _, frac = name.partition("/")
        cfg["train"] = {"schedule": name, **({"decay_fraction": float(frac)} if frac else {}),
                        **({"ema_decay": float(ema)} if ema else {})}
    if data:  # (num_train, epochs)
        cfg["dataset"]["synthetic"]["num_train"] = data[0]
        cfg.setdefault("train", {})["epochs"] = data[1]
    if num_test:  # the held-out split's size (2,000 before session 18: unlabelled)
        cfg["dataset"]["synthetic"]["num_test"] = num_test
    if patch:  # the tiny ViT's patch size (4 px: the model of the runs before the label)
        cfg["model"] = {"name": "clipbd-tiny-vit", "arch": {"vision_cfg": {"patch_size": patch}}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    # meta.json says what ran last (here a 1-thread re-scoring); the pretrain marker, what trained it
    (run / "meta.json").write_text(json.dumps({"threads": 1, "cpu": "test cpu"}))
    (run / "stages").mkdir()
    (run / "stages" / "pretrain.json").write_text(json.dumps({"machine": {"threads": threads, "cpu": "test cpu"}}))
    (run / "metrics.json").write_text(json.dumps(values))


def test_collector_reports_mean_min_max_per_attack_and_thread_count(tmp_path):
    for seed, (asr, dao) in enumerate([(1.0, 0.99), (0.9, 0.95), (0.95, 0.97)]):
        _run(tmp_path, f"bn{seed}", "badnets", seed, 2, {"attack/asr": asr, "detect/dao/auroc": dao,
                                                        "eval/clean_acc": 0.8 + seed / 100})
    _run(tmp_path, "clean0", None, 0, 2, {"eval/clean_acc": 0.6})
    _run(tmp_path, "bn0t1", "badnets", 0, 1, {"attack/asr": 0.5, "eval/clean_acc": 0.7})
    _run(tmp_path, "bn0wsd", "badnets", 0, 2, {"attack/asr": 0.25, "eval/clean_acc": 0.9}, schedule="wsd")
    for seed, (bn, clean) in enumerate([(0.85, 0.80), (0.84, 0.86)]):  # the uniform world, paired by seed
        _run(tmp_path, f"u_bn{seed}", "badnets", seed, 2, {"attack/asr": 1.0, "eval/clean_acc": bn}, "wsd", None)
        _run(tmp_path, f"u_clean{seed}", None, seed, 2, {"eval/clean_acc": clean}, "wsd", [2] * 8)
    # twice the training images for half the epochs: another recipe, grouped and paired apart
    _run(tmp_path, "d_bn0", "badnets", 0, 2, {"attack/asr": 1.0, "eval/clean_acc": 0.91}, "wsd", None, (20000, 9))
    _run(tmp_path, "d_clean0", None, 0, 2, {"eval/clean_acc": 0.87}, "wsd", None, (20000, 9))
    # a longer decay and a weight average are other recipes: grouped and paired apart
    _run(tmp_path, "e_bn0", "badnets", 0, 2, {"attack/asr": 1.0, "eval/clean_acc": 0.95}, "wsd/0.4+ema0.999", None)
    _run(tmp_path, "e_clean0", None, 0, 2, {"eval/clean_acc": 0.93}, "wsd/0.4+ema0.999", None)
    _run(tmp_path, "f_clean0", None, 0, 2, {"eval/clean_acc": 0.5}, "wsd/0.2")  # 0.2 is wsd's default: plain wsd
    # another patch size is another model: grouped and paired apart; 4 px is the unlabelled model
    _run(tmp_path, "p_bn0", "badnets", 0, 2, {"attack/asr": 1.0, "eval/clean_acc": 0.77}, "wsd", None, (20000, 9), 8)
    _run(tmp_path, "p_clean0", None, 0, 2, {"eval/clean_acc": 0.80}, "wsd", None, (20000, 9), 8)
    _run(tmp_path, "p4_clean1", None, 1, 2, {"eval/clean_acc": 0.70}, "wsd", None, (20000, 9), 4)
    # a larger held-out split is another measurement: grouped and paired apart; 2,000 is unlabelled
    _run(tmp_path, "t_bn0", "badnets", 0, 2, {"attack/asr": 1.0, "eval/clean_acc": 0.93}, "wsd", None, (20000, 18), 8, 10000)
    _run(tmp_path, "t_clean0", None, 0, 2, {"eval/clean_acc": 0.92}, "wsd", None, (20000, 18), 8, 10000)
    _run(tmp_path, "t2k_clean1", None, 1, 2, {"eval/clean_acc": 0.90}, "wsd", None, (20000, 18), 8, 2000)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments/seeds/collect.py"), str(tmp_path),
                           "--out", str(out)], capture_output=True, text=True, check=True)
    text = (out / "summary.md").read_text()
    assert text == proc.stdout.rstrip("\n") + "\n"
    blocks = {b.split(":")[0]: b for b in text.split("### ")[1:]}
    rare = "world=1,1,1,1,1,1,1,0.08"
    bn = blocks[f"attack=badnets, schedule=cosine, {rare}, threads=2"]
    assert "3 runs (seeds [0, 1, 2])" in bn
    assert "| attack/asr | 0.950 | 0.900 | 1.000 | 0.100 |" in bn
    assert "| eval/clean_acc | 0.810 | 0.800 | 0.820 | 0.020 |" in bn
    assert "| attack/asr | 0.500 | 0.500 | 0.500 | 0.000 |" in blocks[f"attack=badnets, schedule=cosine, {rare}, threads=1"]
    assert "| attack/asr | 0.250 | 0.250 | 0.250 | 0.000 |" in blocks[f"attack=badnets, schedule=wsd, {rare}, threads=2"]
    assert "| eval/clean_acc | 0.600 |" in blocks[f"attack=none, schedule=cosine, {rare}, threads=2"]
    # equal weights and no weights are one world; the cost is paired seed by seed within it
    assert "2 runs (seeds [0, 1])" in blocks["attack=none, schedule=wsd, world=uniform, threads=2"]
    cost = blocks["cost of attack=badnets in clean accuracy, paired by seed (schedule=wsd, world=uniform, threads=2)"]
    assert "| clean_acc − clean_acc(none) | +0.015 | -0.020 | +0.050 | 0.070 | 0: +0.050, 1: -0.020 |" in cost
    # the cosine seed-0 pair (0.80 against 0.60), and no pair across schedules, worlds or threads
    assert "0: +0.200 |" in blocks[f"cost of attack=badnets in clean accuracy, paired by seed (schedule=cosine, {rare}, threads=2)"]
    big = blocks["cost of attack=badnets in clean accuracy, paired by seed (schedule=wsd, world=uniform, data=20000x9, threads=2)"]
    assert "0: +0.040 |" in big
    assert "2 runs (seeds [0, 1])" in blocks["attack=none, schedule=wsd, world=uniform, data=20000x9, threads=2"]
    patch8 = blocks["cost of attack=badnets in clean accuracy, paired by seed (schedule=wsd, world=uniform, data=20000x9, model=patch8, threads=2)"]
    assert "0: -0.030 |" in patch8
    ema = blocks["cost of attack=badnets in clean accuracy, paired by seed (schedule=wsd/0.4+ema0.999, world=uniform, threads=2)"]
    assert "0: +0.020 |" in ema
    assert "| eval/clean_acc | 0.500 |" in blocks[f"attack=none, schedule=wsd, {rare}, threads=2"]
    assert "0: +0.400 |" in blocks[f"cost of attack=badnets in clean accuracy, paired by seed (schedule=wsd, {rare}, threads=2)"]
    test10k = blocks["cost of attack=badnets in clean accuracy, paired by seed (schedule=wsd, world=uniform, data=20000x18/test10000, model=patch8, threads=2)"]
    assert "0: +0.010 |" in test10k
    assert "1 runs (seeds [1])" in blocks["attack=none, schedule=wsd, world=uniform, data=20000x18, model=patch8, threads=2"]
    assert sum(b.startswith("cost of") for b in blocks) == 7
    rows = (out / "runs.csv").read_text().splitlines()
    assert len(rows) == 1 + 21 and rows[0].split(",")[5] == "model"
    from PIL import Image
    with Image.open(out / "seeds.png") as im:  # the strip chart of every run, drawn for a person to read
        assert im.format == "PNG" and im.size[0] > 500 and im.size[1] > 500


def test_the_seed_chart_plots_every_run_of_a_group_and_only_what_differs_between_groups(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("seeds_collect", ROOT / "experiments/seeds/collect.py")
    collect = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(collect)
    for seed, (acc, dao) in enumerate([(0.93, 0.99), (0.91, 0.97)]):
        _run(tmp_path, f"bn{seed}", "badnets", seed, 2, {"attack/asr": 1.0, "detect/dao/auroc": dao,
                                                        "eval/clean_acc": acc}, "wsd", None)
        _run(tmp_path, f"cl{seed}", None, seed, 2, {"eval/clean_acc": acc - 0.01}, "wsd", None)
    _run(tmp_path, "bn0t1", "badnets", 0, 1, {"attack/asr": 1.0, "detect/dao/auroc": 0.96,
                                              "eval/clean_acc": 0.92}, "wsd", None)
    rows = [collect.run_row(p.parent) for p in sorted(tmp_path.rglob("metrics.json"))]
    common, points = collect.plot_points(rows)
    assert common == "schedule=wsd, world=uniform"
    acc = dict(points["eval/clean_acc"])
    assert acc == {"attack=badnets, threads=1": [(0, 0.92)],
                   "attack=badnets, threads=2": [(0, 0.93), (1, 0.91)],
                   "attack=none, threads=2": [(0, pytest.approx(0.92)), (1, pytest.approx(0.90))]}
    # the clean runs have no detector score: the DAO panel holds the BadNets groups only
    assert dict(points["detect/dao/auroc"]) == {"attack=badnets, threads=1": [(0, 0.96)],
                                                "attack=badnets, threads=2": [(0, 0.99), (1, 0.97)]}
    assert collect.plot(rows, tmp_path / "seeds.png") and (tmp_path / "seeds.png").stat().st_size > 10_000
    assert not collect.plot([], tmp_path / "none.png") and not (tmp_path / "none.png").exists()


@pytest.mark.parametrize("experiment", [[], ["+experiment=natural"]])
def test_every_caption_of_the_embedded_world_fits_the_tiny_text_tower(experiment):
    # The tiny text tower reads 16 tokens (half the compute of 32; issue 18's time budget). The CLIP
    # text tower is causal and reads the end-of-text token, so a caption that fits gives the same
    # features as under a longer context; one that does not would be cut silently.
    import numpy as np
    from omegaconf import OmegaConf
    from open_clip.tokenizer import SimpleTokenizer

    from clipbd.data.synthetic import generate_sample, world_from_dict, zeroshot_prompts

    cfg = compose_cfg(experiment)
    world = world_from_dict(OmegaConf.to_container(cfg.dataset.synthetic.world, resolve=True))
    rng = np.random.default_rng(0)
    captions = [generate_sample(rng, world)[1] for _ in range(3000)]
    captions += [p for c in world.classes for p in zeroshot_prompts(c, world, n=64)]
    captions.append(world.motif_caption)
    tok = SimpleTokenizer()
    longest = max(len(tok.encode(c)) + 2 for c in captions)  # + start and end of text
    assert longest <= cfg.model.arch.text_cfg.context_length, longest


@pytest.mark.slow
def test_averaging_probe_evaluates_each_weight_set_and_plots_the_curve(tmp_path):
    from conftest import run_cli

    run = tmp_path / "ema"
    run_cli("+experiment=smoke", f"hydra.run.dir={run}", "train.epochs=3", "train.ema_decay=0.9",
            "stages=[data,poison,pretrain,evaluate]")
    out = tmp_path / "avg.csv"
    subprocess.run([sys.executable, str(ROOT / "experiments/default/averaging.py"), str(run), "--curve",
                    "--last", "2", "5", "--out", str(out)], capture_output=True, text=True, check=True)
    rows = {r["weights"]: float(r["clean_acc"]) for r in csv.DictReader(out.open())}
    assert list(rows) == ["raw epoch_1", "raw epoch_2", "raw", "ema 0.9", "mean of last 2 epochs"]  # only 3 epochs: no last 5
    assert all(0.0 <= v <= 1.0 for v in rows.values())
    # the evaluate stage read the average: the probe's EMA row is the run's own metric
    assert rows["ema 0.9"] == round(json.loads((run / "metrics.json").read_text())["eval/clean_acc"], 4)
    png = tmp_path / "curves.png"
    subprocess.run([sys.executable, str(ROOT / "experiments/default/plot_curves.py"), str(out), "--out", str(png)],
                   capture_output=True, text=True, check=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_heldout_size_probe_equals_the_pipeline_on_a_larger_split_without_retraining(tmp_path):
    """experiments/default/heldout_size.py (issue 18, session 18): a run's own split is the prefix of
    the larger one; the probe's figure is what the pipeline reports once dataset.synthetic.num_test
    grows, and the pipeline gets there without retraining."""
    from conftest import run_cli

    run = tmp_path / "run"
    run_cli("+experiment=smoke", f"hydra.run.dir={run}", "stages=[data,poison,pretrain,evaluate]")
    trained = (run / "stages" / "pretrain.json").read_text()
    out = tmp_path / "heldout.csv"
    subprocess.run([sys.executable, str(ROOT / "experiments/default/heldout_size.py"), str(run), "--num-test", "400",
                    "--cache", str(tmp_path / "cache"), "--out", str(out)], capture_output=True, text=True, check=True)
    (row,) = list(csv.DictReader(out.open()))
    recorded = json.loads((run / "metrics.json").read_text())
    assert float(row["clean_acc_own"]) == recorded["eval/clean_acc"] and row["n"] == "400"
    proc = run_cli("+experiment=smoke", f"hydra.run.dir={run}", "stages=[data,poison,pretrain,evaluate]",
                   "dataset.synthetic.num_test=400")
    assert "400 test images" in proc.stderr + proc.stdout or "400 test images" in (run / "run.log").read_text()
    assert (run / "stages" / "pretrain.json").read_text() == trained  # kept, not retrained
    after = json.loads((run / "metrics.json").read_text())
    assert after["eval/clean_acc"] == float(row["clean_acc"]) and after["attack/asr"] == float(row["asr"])


def test_variance_probe_rescores_a_run_at_its_own_setting_as_the_pipeline_scored_it(tmp_path):
    from conftest import run_cli

    run = tmp_path / "smoke"
    run_cli("+experiment=smoke", f"hydra.run.dir={run}", "stages=[data,poison,pretrain,extract,reduce,evaluate]")
    out = tmp_path / "var"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments/default/variance.py"), str(run), "--grid", "100:16,100:8n",
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [(r["batch_size"], r["k"], r["normalised"]) for r in rows] == [("100", "16", "False"), ("100", "8", "True")]
    metrics = json.loads((run / "metrics.json").read_text())
    for m in ("dao", "kdist", "slof"):  # the run's own (batch 100, k 16): the probe cuts batches as the pipeline does
        assert float(rows[0][m]) == pytest.approx(metrics[f"detect/{m}/auroc"], abs=6e-5)
    bad = subprocess.run([sys.executable, str(ROOT / "experiments/default/variance.py"), str(run), "--grid", "100-16"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--grid item '100-16' is not batch:k" in bad.stderr
