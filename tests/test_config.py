"""Config tests: every experiment composes, every `_target_` binds, bad keys fail in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CONF, compose_cfg, run_cli
from omegaconf import OmegaConf

from clipbd.registry import ConfigError, check_node

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _target_nodes(node, path=""):
    if OmegaConf.is_dict(node):
        if node.get("_target_") is not None:
            yield path, node
        for k in node.keys():
            yield from _target_nodes(node[k], f"{path}.{k}" if path else str(k))


@pytest.mark.parametrize("experiment", [None, *EXPERIMENTS])
def test_every_experiment_composes_and_binds(experiment, tmp_path):
    cfg = compose_cfg([f"+experiment={experiment}"] if experiment else [], run_dir=tmp_path)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    nodes = list(_target_nodes(cfg))
    assert nodes, "expected plug-in nodes (detectors, prompts, attack)"
    for where, node in nodes:
        check_node(node, where)


@pytest.mark.parametrize("group", ["dataset", "model", "attack", "detector"])
def test_every_group_option_composes(group, tmp_path):
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        cfg = compose_cfg([f"{group}={option}"], run_dir=tmp_path)
        for where, node in _target_nodes(cfg):
            check_node(node, where)


def test_default_is_the_documented_experiment(tmp_path):
    cfg = compose_cfg([], run_dir=tmp_path)
    assert cfg.name == "default"
    assert list(cfg.detector) == ["dao", "slof", "kdist", "lid"]
    assert cfg.attack["_target_"].endswith("BadNets")
    assert cfg.stages == ["data", "poison", "pretrain", "extract", "reduce", "report", "evaluate"]


def test_unknown_plugin_key_is_named():
    with pytest.raises(ConfigError, match=r"detector\.dao: unknown key\(s\) kk .*valid keys: method, k, convention"):
        check_node({"_target_": "clipbd.detectors.neighbourhood.Neighbourhood", "method": "dao", "kk": 3}, "detector.dao")


def _one_error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("clipbd: error:")]
    assert proc.returncode != 0
    assert len(lines) == 1, proc.stderr
    return lines[0]


def _cli_error(monkeypatch, capsys, *args: str) -> str:
    """`python -m clipbd.run ARGS` in this process, for errors raised before Hydra starts a run
    (composition): the one stderr line, checked to be the only one, and exit status 2."""
    from clipbd.run import cli

    monkeypatch.setattr("sys.argv", ["clipbd.run", *args])
    with pytest.raises(SystemExit) as exit_:
        cli()
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("clipbd: error: "), err
    return lines[0]


def test_misspelt_key_fails_in_one_line(tmp_path, monkeypatch, capsys):
    line = _cli_error(monkeypatch, capsys, "train.epochz=3", f"hydra.run.dir={tmp_path}/r")
    assert "train.epochz" in line and "did you mean 'train.epochs'" in line
    assert "Traceback" not in line


def test_misspelt_key_in_experiment_file_fails_in_one_line(tmp_path):
    """An experiment file outside conf/ (on Hydra's search path), so no test writes into conf/."""
    from clipbd.cli import one_line_composition_error

    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "_pytest_bad.yaml").write_text("# @package _global_\nscoring:\n  batch_sise: 3\n")
    with pytest.raises(Exception) as err:
        compose_cfg(["+experiment=_pytest_bad", f"hydra.searchpath=[file://{tmp_path}]"])
    line = one_line_composition_error(err.value)
    assert "batch_sise" in line and "scoring.batch_size" in line


def test_unknown_experiment_lists_options(tmp_path, monkeypatch, capsys):
    line = _cli_error(monkeypatch, capsys, "+experiment=nope", f"hydra.run.dir={tmp_path}/r")
    assert "experiment/nope" in line and "smoke" in line


def test_missing_shard_path_fails_in_one_line(tmp_path):
    proc = run_cli("+experiment=scan", f"dataset.shards={tmp_path}/nowhere/{{00000..00003}}.tar",
                   "model.checkpoint=x.pt", f"hydra.run.dir={tmp_path}/r", check=False)
    line = _one_error_line(proc)
    assert "nowhere" in line and "00000.tar" in line


def test_cc3m_experiment_says_what_to_set(tmp_path):
    proc = run_cli("+experiment=cc3m_badnet_dao", f"hydra.run.dir={tmp_path}/r", check=False)
    line = _one_error_line(proc)
    assert "dataset.shards" in line


def test_help_lists_groups():
    proc = run_cli("--help")
    assert "experiment:" in proc.stdout and "detector:" in proc.stdout


def test_lr_schedules_cosine_and_wsd():
    from clipbd.models.train import lr_at

    # cosine (the default): linear warm-up, then half a cosine to 0
    assert lr_at(0, 1.0, 10, 110) == pytest.approx(0.1)
    assert lr_at(10, 1.0, 10, 110) == pytest.approx(1.0)
    assert lr_at(60, 1.0, 10, 110) == pytest.approx(0.5)
    assert lr_at(110, 1.0, 10, 110) == pytest.approx(0.0)
    # wsd: the peak held until the last 20% of the steps, then linear to 0
    wsd = [lr_at(s, 1.0, 10, 110, "wsd", 0.2) for s in range(111)]
    assert wsd[9] == pytest.approx(1.0) and wsd[10:88] == [1.0] * 78
    assert wsd[88] == pytest.approx(1.0) and wsd[99] == pytest.approx(0.5) and wsd[110] == 0.0
    assert all(a >= b for a, b in zip(wsd[10:], wsd[11:]))


def test_optimiser_is_fused_adamw_with_openclips_groups_and_steps_like_foreach():
    import torch
    from omegaconf import OmegaConf

    from clipbd.models.train import make_optimizer, param_groups

    tc = OmegaConf.create({"lr": 1e-2, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.98, "eps": 1e-6})
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    b = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    b.load_state_dict(a.state_dict())
    opt = make_optimizer(a, tc)
    assert opt.defaults["fused"] is True and not opt.defaults["foreach"]
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.1]  # matrices decay; bias and norm do not
    ref = torch.optim.AdamW(param_groups(b, 0.1), lr=1e-2, betas=(0.9, 0.98), eps=1e-6, foreach=True)
    x = torch.randn(16, 8)
    for _ in range(5):
        for model, o in ((a, opt), (b, ref)):
            o.zero_grad()
            model(x).pow(2).mean().backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-5)  # AdamW's arithmetic, rounded differently


def test_weight_ema_averages_with_warm_up_and_round_trips():
    import torch

    from clipbd.models.train import WeightEMA

    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(0.0)
        model.bias.fill_(0.0)
    ema = WeightEMA(model, 0.5)
    values = [1.0, 2.0, 3.0, 4.0]
    expected = 0.0
    for t, v in enumerate(values):
        with torch.no_grad():
            model.weight.fill_(v)
        ema.update(model)
        d = min(0.5, (1 + t) / (10 + t))  # step 0 keeps 1/10 of the old average, later steps decay 0.5
        expected = d * expected + (1 - d) * v
        assert torch.allclose(ema.shadow["weight"], torch.full((2, 3), expected)), t
    assert ema.shadow["bias"].abs().max() == 0  # an unchanged weight stays where it was
    assert model.weight[0, 0].item() == 4.0  # the model itself is never touched
    other = WeightEMA(torch.nn.Linear(3, 2), 0.5)
    other.load_state_dict(ema.state_dict())
    assert other.steps == 4 and torch.equal(other.shadow["weight"], ema.shadow["weight"])
    with pytest.raises(ConfigError, match=r"train.ema_decay=1.0: must be in \(0, 1\)"):
        WeightEMA(model, 1.0)


def _pretrain_keys(cfg, setting: str, values: list) -> list[str]:
    """The pretrain stage's key with `setting` at each of `values` in turn (left at the last)."""
    from clipbd import runstate

    keys = []
    for v in values:
        OmegaConf.update(cfg, setting, v)
        keys.append(runstate.stage_key(cfg, "pretrain"))
    return keys


def test_ema_setting_is_checked_and_keyed_only_when_set(tiny_cfg):
    from clipbd import checks, runstate

    plain = runstate.stage_key(tiny_cfg, "pretrain")
    null, averaged, faster = _pretrain_keys(tiny_cfg, "train.ema_decay", [None, 0.999, 0.99])
    assert null == plain  # null: earlier runs keep their key
    assert len({plain, averaged, faster}) == 3
    OmegaConf.update(tiny_cfg, "train.ema_decay", 1.5)
    with pytest.raises(ConfigError, match=r"train.ema_decay=1.5: .* must be in \(0, 1\)"):
        checks.check_values(tiny_cfg)


def test_schedule_settings_are_checked_and_keyed(tiny_cfg):
    from clipbd import checks

    cosine, = _pretrain_keys(tiny_cfg, "train.schedule", ["cosine"])  # the embedded default is wsd
    OmegaConf.update(tiny_cfg, "train.decay_fraction", 0.2)  # its default: the cosine key stays
    assert _pretrain_keys(tiny_cfg, "train.schedule", ["cosine"]) == [cosine]
    wsd, = _pretrain_keys(tiny_cfg, "train.schedule", ["wsd"])
    longer, = _pretrain_keys(tiny_cfg, "train.decay_fraction", [0.5])
    assert len({cosine, wsd, longer}) == 3
    OmegaConf.update(tiny_cfg, "train.decay_fraction", 0.0)
    with pytest.raises(ConfigError, match=r"train.decay_fraction=0.0: .* must be in \(0, 1\]"):
        checks.check_values(tiny_cfg)
    OmegaConf.update(tiny_cfg, "train.decay_fraction", 0.2)
    OmegaConf.update(tiny_cfg, "train.schedule", "linear")
    with pytest.raises(ConfigError, match="train.schedule=linear: must be one of cosine, wsd"):
        checks.check_values(tiny_cfg)
