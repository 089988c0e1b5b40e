"""Shared files of a run directory that several stages update."""

from __future__ import annotations

from pathlib import Path

from clipbd.utils import read_json, write_json


def update_metrics(run_dir: Path, prefix: str, new: dict) -> dict:
    """Replace every `prefix*` key of metrics.json by `new` (other stages' keys are kept)."""
    path = Path(run_dir) / "metrics.json"
    old = read_json(path) if path.exists() else {}
    merged = {k: v for k, v in old.items() if not k.startswith(prefix)} | new
    write_json(path, dict(sorted(merged.items())))
    return merged
