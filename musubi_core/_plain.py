"""Plain JSON data: values whose type-tagged tree (:mod:`musubi_core._tagged`) is the value
itself, so the C JSON encoder produces their identity bytes and their stored payload directly.

Strings, ints, bools, None, lists and dicts with string keys not starting with ``$`` are plain;
finite floats are plain once tagged (``{"$float": repr}``, as the tagged encoder does); data
nested deeper than ``MAX_DEPTH`` is not (the tagged encoder refuses it and names where). The
results are byte-for-byte those of ``identity.canonical_bytes`` and ``JSONCodec.encode`` (which
use these first and fall back to the tagged encoder for anything else); adapters reach them
through :mod:`musubi_core.fastpath`.

>>> plain_tree({"q": "a", "t": 0.5})
{'q': 'a', 't': {'$float': '0.5'}}
>>> plain_tree((1,)) is NOT_PLAIN
True
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from typing import Any

from ._tagged import MAX_DEPTH

_fast_loads: Callable[[bytes], Any] | None
try:  # a C parser, three to four times json.loads on a stored payload; optional
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - orjson is a dependency where it installs
    _fast_loads = None

__all__ = [
    "COMPACT_JSON",
    "NOT_PLAIN",
    "SORTED_JSON",
    "is_plain_json",
    "plain_input_hash",
    "plain_payload",
    "plain_tree",
]


def _plain_kind(value: object, depth: int = 1) -> int:
    """0: not plain JSON data; 1: plain, no floats; 2: plain with (finite) floats.
    ``depth``: how many containers ``value`` is inside of, itself included."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return 1
    if kind is float:
        return 2 if math.isfinite(value) else 0  # type: ignore[arg-type]
    if kind is list:
        items: Any = value
    elif kind is dict:
        for key in value:  # type: ignore[attr-defined]
            if type(key) is not str or key.startswith("$"):
                return 0
        items = value.values()  # type: ignore[attr-defined]
    else:
        return 0
    if depth > MAX_DEPTH:
        return 0  # too deep to be stored: the tagged encoder says where
    found = 1
    for v in items:
        t = type(v)
        if t is str or t is int or t is bool or v is None:
            continue  # the common leaves, without a call
        k = _plain_kind(v, depth + 1)
        if k == 0:
            return 0
        if k == 2:
            found = 2
    return found


def _tag_floats(value: Any) -> Any:
    kind = type(value)
    if kind is float:
        return {"$float": repr(value)}
    if kind is list:
        return [_tag_floats(v) for v in value]
    if kind is dict:
        return {k: _tag_floats(v) for k, v in value.items()}
    return value


def is_plain_json(value: object) -> bool:
    """True for exact ``str``/``int``/``bool``/``None``, ``list`` and ``dict`` with ``str`` keys
    not starting with ``$``, nested: the values whose tagged form is the value itself. Floats
    (tagged), tuples (tagged), subclasses and ``$`` keys (escaped) are not plain.

    >>> is_plain_json({"q": ["a", 1, True, None]}), is_plain_json({"x": 1.5}), is_plain_json((1,))
    (True, False, False)
    """
    return _plain_kind(value) == 1


_NOT_PLAIN: Any = object()


def plain_tree(value: Any) -> Any:
    """The tagged tree of JSON-shaped data (plain JSON plus finite floats, which the core tags
    as ``{"$float": repr}``), or :data:`NOT_PLAIN` for anything else (use the core's encoder).
    Feed the tree to :func:`plain_input_hash` / :func:`plain_payload`.

    >>> plain_tree({"t": 0.5, "q": "a"})
    {'t': {'$float': '0.5'}, 'q': 'a'}
    >>> plain_tree((1,)) is NOT_PLAIN
    True
    """
    kind = _plain_kind(value)
    if kind == 1:
        return value
    if kind == 2:
        return _tag_floats(value)
    return _NOT_PLAIN


NOT_PLAIN = _NOT_PLAIN


def plain_input_hash(value: object) -> str:
    """``identity.input_hash(v)`` given ``value = plain_tree(v)`` (or a plain JSON ``v``).

    >>> from musubi_core.identity import input_hash
    >>> v = {"b": [1, "x", None], "a": {"é": True}}
    >>> plain_input_hash(v) == input_hash(v)
    True
    """
    # Sorted keys are the canonical tree's order; surrogatepass as identity.canonical_bytes.
    return hashlib.sha256(SORTED_JSON(value).encode("utf-8", "surrogatepass")).hexdigest()


def plain_payload(value: object) -> bytes:
    """``JSONCodec().encode(v)[1]`` given ``value = plain_tree(v)`` (or a plain JSON ``v``).

    >>> from musubi_core.codec import JSONCodec
    >>> v = {"b": [1, "x", None], "a": {"é": True}}
    >>> plain_payload(v) == JSONCodec().encode(v)[1]
    True
    """
    return COMPACT_JSON(value).encode("utf-8", "surrogatepass")


# The encoders ``json.dumps(tree, sort_keys=..., separators=(",", ":"), ensure_ascii=False)``
# builds on every call, made once: the same text.
SORTED_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode
COMPACT_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


# Digits as "0", so that one substring search finds a run of 19 of them: an integer literal
# orjson would turn into a float past 64 bits. (A regular expression takes 5 µs here.)
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGITS = b"0" * 19


def load_json(payload: bytes) -> Any:
    """The JSON value of stored UTF-8 ``payload``, as ``json.loads`` parses it (lone surrogates,
    ``NaN`` and integers of any size included). orjson parses it where its result is the
    same: it refuses what it cannot parse exactly (surrogates, ``NaN``, out-of-range
    exponents), and a payload holding a run of 19 digits (an integer it would make a float)
    is left to ``json``. Raises what ``json.loads`` raises.

    >>> load_json(b'{"a":[1,"x",null]}')
    {'a': [1, 'x', None]}
    >>> load_json(b"[123456789012345678901234567890]")
    [123456789012345678901234567890]
    """
    if _fast_loads is not None and _LONG_DIGITS not in payload.translate(_DIGITS_AS_ZERO):
        try:
            return _fast_loads(payload)
        except ValueError:  # orjson.JSONDecodeError: json decides (and says why)
            pass
    return json.loads(payload.decode("utf-8", "surrogatepass"))
