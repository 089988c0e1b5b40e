"""Small shared helpers: atomic file writes, derived seeds, progress bars, git revision."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

_PROGRESS_MODE = "auto"


def set_progress_mode(mode: str) -> None:
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"logging.progress={mode!r}: must be one of auto, always, never")
    global _PROGRESS_MODE
    _PROGRESS_MODE = mode


def progress_enabled() -> bool:
    """Progress bars are shown only on a terminal (logging.progress=auto), so logs stay clean."""
    return _PROGRESS_MODE == "always" or (_PROGRESS_MODE == "auto" and sys.stderr.isatty())


def progress(it: Iterable, **kw: Any) -> Iterable:
    return tqdm(it, disable=not progress_enabled(), dynamic_ncols=True, **kw)


def derive_seed(seed: int, purpose: str) -> int:
    """A separate, stable 63-bit seed per purpose ('poison', 'shuffle', 'init', ...)."""
    ss = np.random.SeedSequence([int(seed), zlib.crc32(purpose.encode())])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def rng(seed: int, purpose: str) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, purpose))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it into place (readers never see halves)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def write_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    """Rows of one shape as CSV with a header (the first row's keys), written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()[:16]


_IMPORTED = time.time()


def process_age() -> float:
    """Seconds since this process started (Linux: /proc; elsewhere: since clipbd.utils was imported)."""
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time() - _IMPORTED


def machine() -> dict:
    """What a run's numbers depend on besides the config: CPU model and torch's thread count (runs are
    bitwise deterministic only for the same CPU kind, torch build and thread count)."""
    import platform

    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__}


def git_revision() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
