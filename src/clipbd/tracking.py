"""Weights & Biases logging (rank 0 only; offline by default, so no network is ever needed).

`logging.wandb.mode=offline` writes `<run_dir>/wandb/offline-run-*` for a later `wandb sync`;
`disabled` turns it off. Runs of one experiment or sweep share a group (the experiment name unless
`logging.wandb.group` is set).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

from clipbd import dist
from clipbd.utils import read_json, write_json

log = logging.getLogger("clipbd")
_RUN: Any = None  # the W&B run, or a _Starting while wandb.init runs; read through _run()


class _Starting:
    """`wandb.init` (and `import wandb`, together 1.5–3 s) in a background thread, so the first stage
    starts while W&B does; the first use joins it and re-raises whatever it raised."""

    def __init__(self, init: Any) -> None:
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._call, args=(init,), name="wandb-init", daemon=True)
        self._thread.start()

    def _call(self, init: Any) -> None:
        try:
            self._result = init()
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread by get()
            self._error = e

    def get(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


def _run() -> Any:
    """The W&B run (waiting for its start if it is still starting), or None."""
    global _RUN
    if isinstance(_RUN, _Starting):
        _RUN = _RUN.get()
    return _RUN


@contextlib.contextmanager
def start(cfg: DictConfig) -> Iterator[Any]:
    global _RUN
    wcfg = cfg.logging.wandb
    if wcfg.mode not in ("online", "offline", "disabled"):
        from clipbd.registry import ConfigError

        raise ConfigError(f"logging.wandb.mode={wcfg.mode}: must be online, offline or disabled")
    if wcfg.mode == "disabled" or not dist.is_main():
        yield None
        return
    os.environ.setdefault("WANDB_SILENT", "true")
    run_dir = Path(cfg.run_dir)
    kwargs = dict(
        project=wcfg.project, entity=wcfg.entity, group=wcfg.group or cfg.name, tags=list(wcfg.tags),
        name=f"{cfg.name}-{run_dir.name}", dir=str(run_dir), mode=wcfg.mode,
        config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous",
        id=_stable_id(run_dir), resume="allow",
    )

    def init() -> Any:
        import wandb

        return wandb.init(**kwargs)

    _RUN = _Starting(init)
    try:
        yield _RUN
    except BaseException:
        # Interrupted (an error, or SystemExit from submitit requeueing a preempted job): close W&B
        # but never let its failure (its service may have been signalled too) hide the real exit.
        try:
            _run().finish(exit_code=1)
        except Exception as e:  # noqa: BLE001
            logging.getLogger("clipbd").warning("W&B did not finish cleanly after an interruption: %s", e)
        raise
    else:
        _run().finish()
    finally:
        _RUN = None


def _stable_id(run_dir: Path) -> str:
    """One W&B run id per run directory, so a resumed run continues the same W&B run."""
    p = run_dir / "wandb_id.txt"
    if not p.exists():
        import secrets

        p.write_text(secrets.token_hex(4))
    return p.read_text().strip()


def log(metrics: dict[str, Any], step: int | None = None) -> None:
    run = _run()
    if run is not None:
        run.log(metrics, step=step)


def log_run_results(cfg: DictConfig, timings: dict[str, float]) -> None:
    """Record stage timings, and send metrics.json and the plots to W&B."""
    if not dist.is_main():
        return
    run_dir = Path(cfg.run_dir)
    timing_path = run_dir / "timing.json"
    old = read_json(timing_path) if timing_path.exists() else {}
    write_json(timing_path, {**old, **timings})
    run = _run()
    if run is None:
        return
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists():
        metrics = {k: v for k, v in read_json(metrics_path).items() if isinstance(v, (int, float))}
        run.summary.update(metrics)
        run.log(metrics)
    import wandb

    images = {f"plots/{p.stem}": wandb.Image(str(p)) for p in sorted((run_dir / "plots").glob("*.png"))}
    if images:
        run.log(images)
    run.summary.update(timings)


def log_report(top: Any, clusters: Any, pngs: dict[int, bytes], n_thumbs: int) -> None:
    """The report's top-N table (a thumbnail in each of the first `n_thumbs` rows) and its cluster
    table, to the W&B run (clipbd.curation.report's TopRows and Cluster rows)."""
    run = _run()
    if run is None:
        return
    import io

    import wandb
    from PIL import Image

    detectors = list(top.scores)
    cols = ["rank", "index", "key", "caption", "cluster", "is_poison", *detectors, "image"]
    table = wandb.Table(columns=cols)
    for r, g in enumerate(top.index.tolist()):
        img = wandb.Image(Image.open(io.BytesIO(pngs[g]))) if r < n_thumbs else None
        poison = None if top.is_poison is None else bool(top.is_poison[r])
        table.add_data(r + 1, g, top.key[r], top.caption[r], int(top.cluster[r]), poison,
                       *[float(top.scores[d][r]) for d in detectors], img)
    ctable = wandb.Table(columns=["cluster", "size_top", "corpus_count", "share_corpus", "best_rank", "n_poison",
                                  "caption"])
    for c in clusters:
        ctable.add_data(c.id, c.size_top, c.corpus_count, float(c.share), c.rows[0] + 1, c.n_poison, c.caption)
    run.log({"report/top": table, "report/clusters": ctable})
