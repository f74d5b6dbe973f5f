"""Sizes for ``musubi gc --max-size`` and ``SQLiteStore(size_limit=...)``: ``"500MB"``,
``"1.5GB"``, ``"800KB"``, ``"4096B"`` or a number of bytes. The units are decimal (1 KB = 1,000
bytes, 1 MB = 1,000,000 bytes, 1 GB = 1,000,000,000 bytes), as disk sizes are sold and as ``ls
-lh --si`` and ``df -H`` print them; binary units (``MiB``) and bare letters (``M``) are refused
rather than guessed.

>>> parse_size("500MB"), parse_size("1.5 GB"), parse_size(2048)
(500000000, 1500000000, 2048)
>>> format_size(1_234_567)
'1.23 MB'
"""

from __future__ import annotations

import re

__all__ = ["UNITS", "format_size", "parse_size"]

UNITS = {"B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*$")
_FORMS = "e.g. 500MB, 1.5GB, 800KB or 4096B (decimal units: 1 MB = 1,000,000 bytes)"


def parse_size(value: str | int) -> int:
    """``value`` in bytes; ``ValueError`` saying what to write for anything else (a bare
    number in a string, an unknown or binary unit, zero or less). An ``int`` is bytes."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"a size is a string like '500MB' or a number of bytes, not {value!r}")
    if isinstance(value, int):
        number = value
    else:
        if re.fullmatch(r"\s*\d+(?:\.\d+)?\s*", value):
            raise ValueError(f"size {value!r} has no unit: write {value.strip()}MB for megabytes "
                             f"({_FORMS})")
        match = _SIZE.match(value)
        unit = match.group(2).upper() if match else ""
        if match is None or unit not in UNITS:
            if match is not None and unit in ("K", "M", "G", "KIB", "MIB", "GIB"):
                raise ValueError(f"invalid size {value!r}: write {match.group(1)}{unit[0]}B "
                                 f"({_FORMS})")
            raise ValueError(f"invalid size {value!r}: use {_FORMS}")
        number = int(float(match.group(1)) * UNITS[unit])
    if number <= 0:
        raise ValueError(f"size {value!r} must be more than 0 bytes ({_FORMS})")
    return number


def format_size(n: int | float) -> str:
    """``n`` bytes for people, in the decimal units :func:`parse_size` reads."""
    for unit in ("GB", "MB", "KB"):
        if abs(n) >= UNITS[unit]:
            return f"{n / UNITS[unit]:.2f} {unit}"
    return f"{int(n)} B"
