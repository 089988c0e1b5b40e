"""Which detector orders a ranked list: `report.sort_by`, or by default the first configured one
whose higher score reliably means more suspicious.

Every clipbd detector is signed so that higher = more suspicious, but for some the sign is a
convention, not a property of the data: a detector says so with `higher_is_suspicious` (a class
attribute or property; absent = True, for user plug-ins). LID is the case in clipbd: its direction
flips with the regime (clipbd.detectors.neighbourhood), so it never orders a ranking by default.
"""

from __future__ import annotations

from typing import Mapping

from clipbd.errors import ConfigError


def sort_detector(detectors: Mapping[str, object], sort_by: str | None = None) -> str:
    """The name of the detector to rank by (descending). `sort_by` must be one of `detectors`;
    None picks the first with higher_is_suspicious, else the first (all point either way)."""
    names = list(detectors)
    if not names:
        raise ValueError("no detectors to rank by")
    if sort_by is not None:
        if sort_by not in detectors:
            raise ConfigError(f"report.sort_by={sort_by}: not a configured detector ({', '.join(names)}); "
                             "name one of them or leave it null")
        return sort_by
    return next((n for n in names if getattr(detectors[n], "higher_is_suspicious", True)), names[0])
