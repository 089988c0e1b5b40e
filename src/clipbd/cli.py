"""What the command line needs around Hydra, shared by `clipbd.run` and `clipbd.launch`: one-line
errors, a composition check before Hydra starts, and the rewriting of arguments Hydra's grammar would
misread (shard brace patterns) or that name a renamed option (`scoring.reference=bank` is the
`scoring=bank` group choice)."""

from __future__ import annotations

import re
import sys
from difflib import get_close_matches
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from clipbd.errors import ClipbdError

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def die(msg: str, code: int = 2) -> None:
    print(f"clipbd: error: {msg}", file=sys.stderr)
    sys.exit(code)


def one_line_composition_error(e: BaseException) -> str:
    """Hydra explains composition failures over several lines and chained exceptions; find the
    bad key (or group option) and say it once, with the closest valid spelling."""
    msgs = []
    while e is not None:
        msgs.append(str(e))
        e = e.__cause__ or e.__context__
    text = "\n".join(msgs)
    full = re.search(r"full_key: (\S+)", text)
    key = re.search(r"Key '([^']+)' (?:is )?not in", text)
    if key:
        name = full.group(1) if full else key.group(1)
        return f"unknown config key '{name}'{_suggest(name)}"
    missing = re.search(r"Could not find '([^']+)'", text)
    if missing:
        opts = re.search(r"Available options[^:]*:\s*((?:\n\t\S+)+)", text)
        avail = ", ".join(opts.group(1).split()) if opts else ""
        return f"no config '{missing.group(1)}'" + (f"; available: {avail}" if avail else "")
    return " ".join(text.split("\n")[0:2]).strip()


def _suggest(full_key: str) -> str:
    from hydra import compose, initialize_config_dir

    parent, _, leaf = full_key.rpartition(".")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    keys = list(node.keys()) if isinstance(node, DictConfig) else []
    close = get_close_matches(leaf, keys, n=1)
    return f" (did you mean '{(parent + '.') if parent else ''}{close[0]}'?)" if close else ""


def precheck(overrides: list[str]) -> None:
    """Compose the config as the run will (without the `hydra.*` overrides): raises on a bad key or
    a `_target_` outside the allow-list (clipbd.registry.check_targets)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    from clipbd.registry import check_targets

    check_targets(cfg)  # a config is data: refuse a `_target_` outside the allow-list before Hydra runs


_BRACE_RANGE = re.compile(r"^([\w.+~/@-]+)=([^'\"\[].*\{[^{}]*\.\.[^{}]*\}.*)$")
_SCORING_REFERENCE = re.compile(r"^scoring\.reference=(\w+)$")


def quote_brace_patterns(args: list[str]) -> list[str]:
    """`dataset.shards=/data/cc3m/{00000..00331}.tar` is a shard pattern, but Hydra's override
    grammar reads `{` as a dict: quote such values so they arrive as the string the user typed."""
    return [f"{m.group(1)}='{m.group(2)}'" if (m := _BRACE_RANGE.match(a)) else a for a in args]


def normalize_overrides(args: list[str]) -> list[str]:
    """The command line as Hydra should read it: brace patterns quoted, and `scoring.reference=X`
    (the key before `scoring` became a config group) as the group choice `scoring=X`."""
    return [f"scoring={m.group(1)}" if (m := _SCORING_REFERENCE.match(a)) else a
            for a in quote_brace_patterns(args)]


def check_command_line(args: list[str]) -> None:
    """Before Hydra starts: any composition failure becomes one line naming the key (exit 2).
    Hydra's own flags (--help, -m, --cfg, ...) skip the check: Hydra handles them."""
    if any(a.startswith("-") for a in args):
        return
    try:
        precheck([a for a in args if not a.startswith(("hydra.", "hydra/"))])
    except Exception as e:  # noqa: BLE001 - any composition failure is the user's config
        msg = str(e) if isinstance(e, ClipbdError) else one_line_composition_error(e)
        _append_run_log(args, msg)
        die(msg)


def _append_run_log(args: list[str], msg: str) -> None:
    """An error found before Hydra starts goes to the run directory's run.log too, if the run
    directory (`hydra.run.dir=...`) already exists (a re-run of an earlier run)."""
    import time

    dirs = [a.split("=", 1)[1].strip("'\"") for a in args if a.startswith("hydra.run.dir=")]
    if dirs and Path(dirs[-1]).is_dir():
        with open(Path(dirs[-1]) / "run.log", "a") as fh:
            fh.write(f"[{time.strftime('%H:%M:%S')} clipbd] clipbd: error: {msg}\n")
