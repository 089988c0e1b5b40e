"""The errors a user can cause, under one base class: `run.py` prints any `ClipbdError` as one line
(`clipbd: error: ...`, exit 2); anything else is a bug and keeps its traceback."""

from __future__ import annotations


class ClipbdError(Exception):
    """A problem the user can fix; the message names the bad value (key, file) and the fix."""


class ConfigError(ClipbdError, ValueError):
    """A config value that cannot work; the message names the key, the value and the fix."""


class DataError(ClipbdError):
    """A dataset problem, told in one line naming the file/member and the fix.

    `reason` names the kind (one of clipbd.data.shards.SKIP_REASONS; `data.on_error=skip` counts
    skipped samples by it) and `member` the key or tar member it concerns ("" for a whole shard)."""

    def __init__(self, message: str, reason: str = "corrupt_shard", member: str = ""):
        super().__init__(message)
        self.reason, self.member = reason, member


class CoverageError(ClipbdError, RuntimeError):
    """Extraction outputs that do not cover every sample exactly once (reduce refuses them)."""
