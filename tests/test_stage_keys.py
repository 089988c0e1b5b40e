"""Stage keys you can trust: each stage, run on the tiny config, reads only config keys that its
key covers — its DEPENDS, the settings it declares UNKEYED, the plumbing every stage may read
(runstate.PLUMBING), or the keys of the stages upstream of it. A key read outside those would let a
changed setting skip a stage whose outputs it changes."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from clipbd import runstate
from clipbd.config import PIPELINE, STAGE_ORDER

pytestmark = pytest.mark.slow


@contextmanager
def recording(root: DictConfig, reads: set[str]):
    """Record the full key of every value of `root` read: leaves by attribute/item/get access, whole
    nodes by to_container / iteration / select (nodes built elsewhere, e.g. by instantiate, are not
    the run's config and are not recorded)."""
    get_impl, to_container, items, keys, select = (DictConfig._get_impl, OmegaConf.to_container,
                                                   DictConfig.items, DictConfig.keys, OmegaConf.select)

    def _get_impl(self, key, default_value, validate_key=True):
        out = get_impl(self, key, default_value, validate_key)
        if not isinstance(out, DictConfig) and self._get_root() is root:
            reads.add(self._get_full_key(key))
        return out

    def whole(node):
        if isinstance(node, (DictConfig, ListConfig)) and node._get_root() is root:
            reads.add(node._get_full_key(None))

    def _to_container(cfg, *a, **kw):
        whole(cfg)
        return to_container(cfg, *a, **kw)

    def _select(cfg, key, *a, **kw):
        out = select(cfg, key, *a, **kw)
        if not isinstance(out, DictConfig) and cfg._get_root() is root:
            reads.add(".".join(p for p in (cfg._get_full_key(None), key) if p))
        return out

    DictConfig._get_impl = _get_impl
    OmegaConf.to_container = staticmethod(_to_container)
    OmegaConf.select = staticmethod(_select)
    DictConfig.items = lambda self: (whole(self), items(self))[1]
    DictConfig.keys = lambda self: (whole(self), keys(self))[1]
    try:
        yield reads
    finally:
        DictConfig._get_impl, DictConfig.items, DictConfig.keys = get_impl, items, keys
        OmegaConf.to_container, OmegaConf.select = staticmethod(to_container), staticmethod(select)


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def covered_by(name: str, cfg: DictConfig) -> tuple[set[str], set[str]]:
    """(keys hashed into stage `name`'s key, directly or through the upstream stages that ran (a
    stage that did not run has no key to pass on); keys it may read unkeyed: UNKEYED, plumbing, and
    what `depends(cfg)` reads to decide which keys are hashed — the key is a function of that choice)."""
    mod = runstate.stage_module(name)
    conditional = getattr(mod, "UPSTREAM_IF", {})  # upstream only when its key is set: that key decides
    deciding: set[str] = set()
    with recording(cfg, deciding):
        keyed = set(runstate.depends(mod, cfg)) | set(conditional.values())
    free = set(getattr(mod, "UNKEYED", ())) | set(runstate.PLUMBING) | deciding
    for up in (*mod.UPSTREAM, *conditional):
        if runstate.read_marker(cfg.run_dir, up) is not None:
            up_keyed, up_free = covered_by(up, cfg)
            keyed |= up_keyed
    return keyed, free


def unkeyed_reads(cfg: DictConfig, stages) -> dict[str, list[str]]:
    """stage -> the config keys it read (check and main) that its key does not cover."""
    bad = {}
    for name in stages:
        reads: set[str] = set()
        with recording(cfg, reads):
            mod = runstate.stage_module(name)
            if hasattr(mod, "check"):
                mod.check(cfg)
            runstate.run_stage(cfg, name)
        keyed, free = covered_by(name, cfg)
        # a read of a whole section is covered only if the whole section is keyed
        wrong = sorted(r for r in reads if r and not _under(r, keyed | free))
        if wrong:
            bad[name] = wrong
    return bad


def test_every_config_key_a_stage_reads_is_in_its_key(tiny_cfg, tmp_path):
    OmegaConf.update(tiny_cfg, "encoder_attack", {"_target_": "clipbd.attacks.encoder.TextTarget", "steps": 2,
                                                   "num_shadow": 16, "batch_size": 8}, merge=False)
    OmegaConf.update(tiny_cfg, "invert", {"caption": "target", "steps": 2, "batch_size": 8, "num_images": 16})
    bad = unkeyed_reads(tiny_cfg, [s for s in STAGE_ORDER if s != "filter"])
    assert not bad, f"config keys read but not in the stage key (add them to DEPENDS or UNKEYED): {bad}"
    # filter-and-retrain: the filter stage reads the finished run above, pretraining drops its top
    source = tiny_cfg.run_dir
    OmegaConf.update(tiny_cfg, "run_dir", str(tmp_path / "retrain"))
    OmegaConf.update(tiny_cfg, "filter.source_run", source)
    bad = unkeyed_reads(tiny_cfg, ["data", "poison", "filter", "pretrain"])
    assert not bad, f"filter-and-retrain: config keys read but not in the stage key: {bad}"
    OmegaConf.update(tiny_cfg, "filter.source_run", None)
    # without pretrain (scanning with a given model): model.checkpoint is what later stages load
    OmegaConf.update(tiny_cfg, "model.checkpoint", str(tmp_path / "run" / "checkpoints" / "latest.pt"))
    OmegaConf.update(tiny_cfg, "run_dir", str(tmp_path / "scan"))
    bad = unkeyed_reads(tiny_cfg, [s for s in STAGE_ORDER if s not in ("pretrain", "filter")])
    assert not bad, f"without pretrain, config keys read but not in the stage key: {bad}"


def test_changing_the_checkpoint_re_evaluates(tiny_cfg, tmp_path):
    """model.checkpoint is what evaluate loads when the run did not pretrain: changing it must
    change evaluate's key (it once did not)."""
    OmegaConf.update(tiny_cfg, "model.checkpoint", str(tmp_path / "a.pt"))
    a = runstate.stage_key(tiny_cfg, "evaluate")
    OmegaConf.update(tiny_cfg, "model.checkpoint", str(tmp_path / "b.pt"))
    assert runstate.stage_key(tiny_cfg, "evaluate") != a
    OmegaConf.update(tiny_cfg, "train.checkpoint_every", 3)  # UNKEYED: never re-trains
    b = runstate.stage_key(tiny_cfg, "pretrain")
    OmegaConf.update(tiny_cfg, "train.checkpoint_every", 1)
    assert runstate.stage_key(tiny_cfg, "pretrain") == b
    assert json.dumps(sorted(runstate.PLUMBING))  # the plumbing list is data, printed in failures


def test_keys_honest_for_image_detectors_a_heldout_bank_and_a_plan_that_reads_the_test_split(tmp_path):
    """The config-dependent keys (`depends(cfg)`): extract keys the image detector (cd) and the
    held-out bank it embeds, poison keys what the targeted attack's plan reads (the test split, its
    labels, the model), and list-valued keys hash."""
    from conftest import compose_cfg

    cfg = compose_cfg(["+experiment=smoke", "device=cpu", "logging.wandb.mode=disabled", "logging.progress=never",
                       "attack=targeted", "detector=[dao,cd,clipscore]", "detector.cd.steps=1", "scoring=bank",
                       "scoring.bank_source=test", "scoring.bank_size=50",
                       "dataset.classes=[circle,square,triangle,star,cross,heart,ring,banana]"],
                      run_dir=tmp_path / "run")
    OmegaConf.update(cfg, "stages", list(PIPELINE), merge=False)
    bad = unkeyed_reads(cfg, PIPELINE)
    assert not bad, f"config keys read but not in the stage key: {bad}"
    extract = runstate.stage_module("extract")
    assert {"detector.cd", "scoring.bank_size", "dataset.test_shards"} <= set(runstate.depends(extract, cfg))
    assert "detector.dao" not in runstate.depends(extract, cfg)
    poison = runstate.stage_module("poison")
    assert {"dataset.test_shards", "dataset.label_key", "model"} <= set(runstate.depends(poison, cfg))
