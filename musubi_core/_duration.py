"""Durations for ``ctx.sleep``: ``"500ms"``, ``"1.5s"``, ``"5m"`` (or
``"5min"``), ``"2h"``, ``"1d"``, ``"1w"``, compound ``"1h30m"``, a number of
seconds, or a ``timedelta``; and ages for ``musubi gc --older-than``
(:func:`age_seconds`), where every number needs a unit and minutes are
``min``: a bare ``m`` could as well mean months.

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

__all__ = ["Duration", "age_seconds", "to_seconds"]

Duration = str | int | float | dt.timedelta

_UNITS = {"ms": 0.001, "s": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_UNIT = r"(?:ms|min|s|m|h|d|w)"
_PART = re.compile(rf"(\d+(?:\.\d+)?)\s*({_UNIT})", re.IGNORECASE)
_BARE_M = re.compile(r"(\d)\s*m(?![a-z])", re.IGNORECASE)
_WHOLE = re.compile(rf"^\s*(?:\d+(?:\.\d+)?\s*{_UNIT}\s*)+$", re.IGNORECASE)


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


def age_seconds(text: str) -> float:
    """An age such as ``"30d"``, ``"12h"``, ``"45min"``, ``"90s"``, ``"500ms"``
    or ``"1w"`` in seconds. A bare number and a bare ``m`` are ambiguous (days
    or seconds? minutes or months?) and raise ``ValueError`` saying what to write.

    >>> age_seconds("45min"), age_seconds("1d12h")
    (2700.0, 129600.0)
    """
    forms = "e.g. 30d, 12h, 45min, 90s, 500ms or 2w"
    if re.fullmatch(r"\s*\d+(?:\.\d+)?\s*", text):
        raise ValueError(f"age {text!r} has no unit: write {text.strip()}d for days ({forms})")
    if any(unit.lower() == "m" for _, unit in _PART.findall(text)) and _WHOLE.match(text):
        minutes = _BARE_M.sub(r"\1min", text.strip())
        raise ValueError(f"age {text!r}: 'm' is ambiguous; write minutes as 'min' ({minutes})")
    if not _WHOLE.match(text):
        raise ValueError(f"invalid age {text!r}: use {forms}")
    return to_seconds(text)
