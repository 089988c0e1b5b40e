"""What the stages need to know about the dataset of a run: its index, test shards, class names and
prompt source (`dataset.prompts`, a `_target_` callable: fn(class_name, n=..., seed=...) -> prompts)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from clipbd.data.shards import ShardIndex, expand_shards
from clipbd.registry import ConfigError, build
from clipbd.utils import read_json

# The config the held-out split is made of: the shards given, or the synthetic world (its seed, size
# and settings) the data stage writes the test split from. Stages that read the split key on these;
# the data stage's identity (what pretraining sees) is the training index alone, so a changed
# `dataset.synthetic.num_test` re-writes the split and re-evaluates, and never retrains.
TEST_SPLIT = ("dataset.test_shards", "dataset.synthetic")


def load_index(cfg: DictConfig) -> ShardIndex:
    path = Path(cfg.run_dir) / "data_index.h5"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the data stage first (stages=[data,...])")
    return ShardIndex.load(path)


def test_shards(cfg: DictConfig) -> list[str]:
    """The held-out shards: `dataset.test_shards` (a brace pattern, glob, directory or list), else
    the test split the data stage wrote (synthetic data), else none."""
    given = cfg.dataset.test_shards
    if given is not None:
        return expand_shards(given if isinstance(given, str) else OmegaConf.to_container(given, resolve=True))
    manifest = Path(cfg.run_dir) / "data.json"
    return list(read_json(manifest).get("test_shards", [])) if manifest.exists() else []


def heldout_shards(cfg: DictConfig) -> list[str]:
    """Held-out shards for a model-level analysis: `dataset.test_shards` when given (any checkpoint,
    no data stage), else the run's own (data.json); [] if there are none."""
    if cfg.dataset.test_shards is not None:
        spec = cfg.dataset.test_shards
        return expand_shards(spec if isinstance(spec, str) else OmegaConf.to_container(spec))
    path = Path(cfg.run_dir) / "data.json"
    return test_shards(cfg) if path.exists() else []


def _world(cfg: DictConfig):
    from clipbd.data.synthetic import world_from_dict

    return world_from_dict(OmegaConf.to_container(cfg.dataset.synthetic.world, resolve=True))


def class_names(cfg: DictConfig) -> list[str]:
    classes = cfg.dataset.classes
    if classes is None and cfg.dataset.synthetic is not None:
        return list(_world(cfg).classes)
    if classes == "imagenet":
        from clipbd.models.zeroshot import imagenet_classes

        return imagenet_classes()
    if classes is None:
        raise ConfigError("dataset.classes is not set: list the zero-shot class names, or 'imagenet'")
    return list(classes)


def prompt_fn(cfg: DictConfig) -> Callable[..., list[str]]:
    """fn(class_name, n, seed) -> prompts written the way the dataset's captions are."""
    node = cfg.dataset.prompts
    if node is None:
        raise ConfigError("dataset.prompts is not set: a `_target_` prompt source is needed for zero-shot "
                          "evaluation and target captions")
    return build(node, "dataset.prompts", _partial_=True)


def synthetic_prompts(class_name: str, n: int = 64, seed: int = 0, *, world: dict) -> list[str]:
    """Prompt source of the synthetic dataset: captions in the training templates."""
    from clipbd.data.synthetic import world_from_dict, zeroshot_prompts

    return zeroshot_prompts(class_name, world_from_dict(dict(world)), n=n, seed=seed)


