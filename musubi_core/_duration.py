"""Durations for ``ctx.sleep``: ``"500ms"``, ``"1.5s"``, ``"5m"``, ``"2h"``,
``"1d"``, compound ``"1h30m"``, a number of seconds, or a ``timedelta``.

>>> to_seconds("1h30m")
5400.0
>>> to_seconds(2)
2.0
>>> import datetime
>>> to_seconds(datetime.timedelta(milliseconds=250))
0.25
"""

from __future__ import annotations

import datetime as dt
import math
import re

__all__ = ["Duration", "to_seconds"]

Duration = str | int | float | dt.timedelta

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", re.IGNORECASE)
_WHOLE = re.compile(r"^\s*(?:\d+(?:\.\d+)?\s*(?:ms|s|m|h|d)\s*)+$", re.IGNORECASE)


def to_seconds(duration: Duration) -> float:
    """``duration`` in seconds; ``ValueError`` for a malformed or negative
    duration, ``TypeError`` for another type. A bare number means seconds
    (``bool`` is refused: ``sleep("x", True)`` is a bug, not one second)."""
    if isinstance(duration, dt.timedelta):
        seconds = duration.total_seconds()
    elif isinstance(duration, bool):
        raise TypeError("a duration cannot be a bool")
    elif isinstance(duration, int | float):
        seconds = float(duration)
    elif isinstance(duration, str):
        if not _WHOLE.match(duration):
            raise ValueError(
                f"invalid duration {duration!r}: use e.g. '500ms', '30s', '5m', '2h', '1d' or "
                "'1h30m', a number of seconds, or a datetime.timedelta"
            )
        seconds = sum(float(n) * _UNITS[u.lower()] for n, u in _PART.findall(duration))
    else:
        raise TypeError(
            f"a duration is a string like '5m', a number of seconds or a timedelta, "
            f"not {type(duration).__name__}"
        )
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"invalid duration {duration!r}: must be finite and not negative")
    return seconds
