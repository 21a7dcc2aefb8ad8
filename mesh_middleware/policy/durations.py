"""Durations in policy files: ``250ms``, ``2s``, ``1m``, ``1h`` (also ``1.5s``)."""

from __future__ import annotations

import re

__all__ = ["DURATION_PATTERN", "parse_duration"]

DURATION_PATTERN = r"^[0-9]+(\.[0-9]+)?(ms|s|m|h)$"
_DURATION = re.compile(DURATION_PATTERN)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Return the duration in seconds; raise ``ValueError`` with the accepted forms."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"expected a duration like '250ms', '2s', '1m' or '1h', got {text!r}")
    unit = match.group(2)
    return float(text[: -len(unit)]) * _UNIT_SECONDS[unit]
