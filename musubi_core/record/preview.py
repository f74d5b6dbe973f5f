"""Short, readable text of a value for a call's input/output preview.

Cheap and bounded (it stops as soon as it has enough text), deterministic, and never calls
``repr`` of arbitrary objects (no memory addresses, no user code): strings, numbers, mappings and
sequences are rendered; objects by a text-like field or property (``content``,
``page_content``, ``text``, or the ``messages`` they hold) or else by their class name.

>>> preview({"question": "What does musubi tie?", "k": 2})
"{question: 'What does musubi tie?', k: 2}"
>>> len(preview("x" * 1000))
160
"""

from __future__ import annotations

from typing import Any

__all__ = ["PREVIEW_CHARS", "preview", "storable_text"]

PREVIEW_CHARS = 160
_TEXT_ATTRS = ("content", "page_content", "text", "messages")
_SCALARS = (int, float, bool)


def preview(value: Any, limit: int = PREVIEW_CHARS) -> str | None:
    """At most ``limit`` characters describing ``value`` (None for None)."""
    if value is None:
        return None
    if type(value) is str:
        text = value
    else:
        flat = _flat_dict(value) if type(value) is dict else None
        if flat is not None and len(flat) <= limit:
            text = flat  # what _render gives when nothing is cut
        else:
            parts: list[str] = []
            _render(value, parts, limit, 0)
            text = "".join(parts)
    return storable_text(text if len(text) <= limit else text[: limit - 1] + "…")


def storable_text(text: str) -> str:
    """``text`` as valid UTF-8 (lone surrogates, which a database refuses, become '?')."""
    if text.isascii():
        return text
    return text.encode("utf-8", "replace").decode("utf-8")


def _flat_dict(value: dict[Any, Any]) -> str | None:
    """The whole text of a dict of strings, numbers and None under string keys (the arguments
    of most steps), or None for anything else: :func:`_render`'s text when it fits."""
    parts = []
    for k, v in value.items():
        if type(k) is not str:
            return None
        t = type(v)
        if t is str:
            parts.append(f"{k}: {v!r}")
        elif t is int or t is float or t is bool or v is None:
            parts.append(f"{k}: {v}")
        else:
            return None
    return "{" + ", ".join(parts) + "}"


def _render(value: Any, out: list[str], budget: int, depth: int) -> int:
    """Append text for ``value`` to ``out``; returns the budget left."""
    if budget <= 0:
        return 0
    if isinstance(value, str):
        piece = repr(value[:budget]) if depth else value[:budget]
    elif value is None or isinstance(value, _SCALARS):
        piece = str(value)
    elif isinstance(value, dict):
        out.append("{")
        budget -= 1
        for i, (k, v) in enumerate(value.items()):
            if budget <= 0:
                break
            key = f"{', ' if i else ''}{k if isinstance(k, str) else type(k).__name__}: "
            out.append(key)
            budget = _render(v, out, budget - len(key), depth + 1)
        out.append("}")
        return budget - 1
    elif isinstance(value, (list, tuple)):
        out.append("[")
        budget -= 1
        for i, v in enumerate(value):
            if budget <= 0:
                break
            if i:
                out.append(", ")
                budget -= 2
            budget = _render(v, out, budget, depth + 1)
        out.append("]")
        return budget - 1
    else:
        attr = _TEXT_ATTR.get(type(value), _UNKNOWN)
        if attr is _UNKNOWN:
            attr = _text_attr(type(value))
        inner = getattr(value, attr, None) if attr is not None else None
        if isinstance(inner, str):
            piece = inner[:budget] if not depth else repr(inner[:budget])
        elif isinstance(inner, (list, tuple)) and depth < 4:
            return _render(inner, out, budget, depth + 1)
        else:
            piece = f"<{type(value).__name__}>"
    out.append(piece)
    return budget - len(piece)


# class -> the attribute that holds its text (or messages), decided once per class: a missing
# attribute of a pydantic model costs ~5 µs to look up, three times per preview.
_UNKNOWN = object()
_TEXT_ATTR: dict[type, Any] = {}


def _text_attr(cls: type) -> str | None:
    fields = getattr(cls, "model_fields", None) or getattr(cls, "__dataclass_fields__", None) or {}
    found = None
    for attr in _TEXT_ATTRS:
        if attr in fields or isinstance(getattr(cls, attr, None), property):
            found = attr
            break
    if len(_TEXT_ATTR) < 4096:
        _TEXT_ATTR[cls] = found
    return found
