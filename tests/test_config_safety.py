"""A config is data (issue 12): a `_target_` outside the allow-list is refused before anything is
built or called, and every value check the config alone can answer runs before any stage, as one
`clipbd: error:` line with exit 2."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from clipbd import runstate
from clipbd.errors import ConfigError
from clipbd.registry import check_targets
from conftest import compose_cfg, run_cli


class _Touch:
    """Unpickling it creates `path` (what a malicious checkpoint's __reduce__ would do)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture
def sentinel(tmp_path) -> tuple[Path, Path]:
    """(a pickle whose loading touches the sentinel, the sentinel path, not there yet)."""
    flag = tmp_path / "SENTINEL"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(_Touch(flag)))
    return evil, flag


REFUSED = [
    ["+detector.evil._target_=torch.load", "+detector.evil.weights_only=false"],
    ["+detector.evil._target_=torch.hub.load", "+detector.evil.repo_or_dir=.", "+detector.evil.model=x",
     "+detector.evil.source=local"],
    ["+detector.evil._target_=builtins.eval", "+detector.evil.source='1+1'"],
    ["+detector.evil._target_=subprocess.run", "+detector.evil.args=[touch,SENTINEL]"],
    ["+detector.evil._target_=os.system", "+detector.evil.command='touch SENTINEL'"],
    ["+detector.evil._target_=pickle.loads"],
    # a path through clipbd's own modules to a foreign callable: the resolved object's module counts
    ["+detector.evil._target_=clipbd.attacks.badnets.np.load"],
    ["+dataset.prompts.extra._target_=os.system"],  # nested anywhere in the config
    ["attack=plugin", "attack.generator=builtins.exec"],  # a plug-in's dotted callable value
]


@pytest.mark.parametrize("overrides", REFUSED, ids=lambda o: o[-1].split("=")[1] if "generator" in o[-1] else o[0])
def test_targets_outside_the_allow_list_are_refused_before_any_call(overrides, sentinel, monkeypatch):
    evil, flag = sentinel
    monkeypatch.chdir(flag.parent)
    cfg = compose_cfg(["+experiment=smoke", *overrides, f"+detector.evil.f={evil}"] if "detector.evil" in overrides[0]
                      else ["+experiment=smoke", *overrides], run_dir=flag.parent / "run")
    with pytest.raises(ConfigError, match=r"not an allowed plug-in|outside the allowed modules") as e:
        runstate.check_stages(cfg)  # what every run does first
    assert "plugins.allow" in str(e.value) and "\n" not in str(e.value)
    assert not flag.exists()


def test_plugins_allow_trusts_a_users_module(tmp_path, monkeypatch):
    pkg = tmp_path / "mydets_i12"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from clipbd.detectors.neighbourhood import Neighbourhood\n\nclass Mine(Neighbourhood):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    over = ["+experiment=smoke", "+detector.mine._target_=mydets_i12.Mine", "+detector.mine.method=dao"]
    with pytest.raises(ConfigError, match=r"detector.mine._target_=mydets_i12.Mine: not an allowed plug-in.*"
                                          r"plugins.allow=\[mydets_i12\]"):
        check_targets(compose_cfg(over))
    check_targets(compose_cfg(over + ["plugins.allow=[mydets_i12]"]))
    # trusting a package does not let a path through it reach another package's callable
    with pytest.raises(ConfigError, match="outside the allowed modules"):
        check_targets(compose_cfg(["+experiment=smoke", "+detector.x._target_=mydets_i12.Neighbourhood.__init__.__globals__",
                                   "plugins.allow=[mydets_i12]"]))


def test_every_shipped_config_passes_the_allow_list():
    conf = Path(__file__).resolve().parents[1] / "conf" / "experiment"
    names = [p.relative_to(conf).with_suffix("").as_posix() for p in conf.rglob("*.yaml")]
    for name in names:
        check_targets(compose_cfg([f"+experiment={name}"]))
    for attack in (Path(__file__).resolve().parents[1] / "conf" / "attack").glob("*.yaml"):
        check_targets(compose_cfg([f"attack={attack.stem}"]))


BAD_VALUES = [
    (["detector.dao.k=0"], "detector.dao"),
    (["attack.poison_rate=1.5"], "attack.poison_rate=1.5"),
    (["attack.poison_rate=-0.1"], "attack.poison_rate=-0.1"),
    (["scoring.batch_size=10"], "scoring.batch_size=10"),
    (["data.on_error=sometimes"], "data.on_error=sometimes"),
    (["report.sort_by=nope"], "report.sort_by=nope"),
    (["model.precision=fp8"], "model.precision=fp8"),
    (["train.epochs=0"], "train.epochs=0"),
    (["train.batch_size=0"], "train.batch_size=0"),
    (["extract.batch_size=0"], "extract.batch_size=0"),
    (["eval.batch_size=0"], "eval.batch_size=0"),
    (["stages=[extract]"], "add pretrain to stages, or set model.checkpoint"),
    (["model.checkpoint=/nonexistent/ckpt.pt"], "model.checkpoint=/nonexistent/ckpt.pt: no such file"),
]


@pytest.mark.parametrize("overrides,msg", BAD_VALUES, ids=lambda v: v[0] if isinstance(v, list) else "")
def test_value_checks_run_before_any_stage(overrides, msg, tmp_path):
    cfg = compose_cfg(["+experiment=smoke", *overrides], run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        runstate.check_stages(cfg)


@pytest.mark.parametrize("overrides,msg", [
    (["+detector.evil._target_=torch.load", "+detector.evil.f=EVIL", "+detector.evil.weights_only=false"],
     "detector.evil._target_=torch.load: not an allowed plug-in"),
    (["detector.dao.k=0"], "detector.dao"),
    (["attack.poison_rate=1.5"], "attack.poison_rate=1.5"),
    (["stages=[extract]"], "add pretrain to stages"),
])
def test_cli_one_line_exit_2_before_any_stage(overrides, msg, sentinel, tmp_path):
    evil, flag = sentinel
    run_dir = tmp_path / "run"
    args = [o.replace("EVIL", str(evil)) for o in overrides]
    proc = run_cli("+experiment=smoke", f"hydra.run.dir={run_dir}", *args, check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clipbd: error: ") and msg in lines[0], proc.stderr
    assert not flag.exists()
    assert not (run_dir / "stages").exists() and not (run_dir / "config.yaml").exists()
    if (run_dir / "run.log").exists():  # the job started: the error is in its log too
        assert msg in (run_dir / "run.log").read_text()


def test_help_is_clipbds_own():
    proc = run_cli("--help", timeout=120)
    assert "+experiment=attacks/NAME" in proc.stdout and "plugins.allow" in proc.stdout
    assert "powered by Hydra" not in proc.stdout
