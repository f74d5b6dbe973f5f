"""Short, readable text of a value for a call's input/output preview.

Cheap and bounded (it stops as soon as it has enough text), deterministic, and never calls
``repr`` of arbitrary objects (no memory addresses, no user code): strings, numbers, mappings and
sequences are rendered; objects by a text-like attribute (``content``, ``page_content``,
``text``) or else by their class name.

>>> preview({"question": "What does musubi tie?", "k": 2})
"{question: 'What does musubi tie?', k: 2}"
>>> len(preview("x" * 1000))
160
"""

from __future__ import annotations

from typing import Any

__all__ = ["PREVIEW_CHARS", "preview", "storable_text"]

PREVIEW_CHARS = 160
_TEXT_ATTRS = ("content", "page_content", "text")
_SCALARS = (int, float, bool)


def preview(value: Any, limit: int = PREVIEW_CHARS) -> str | None:
    """At most ``limit`` characters describing ``value`` (None for None)."""
    if value is None:
        return None
    if type(value) is str:
        text = value
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
        for attr in _TEXT_ATTRS:
            text = getattr(value, attr, None) if not isinstance(value, type) else None
            if isinstance(text, str):
                piece = text[:budget] if not depth else repr(text[:budget])
                break
        else:
            piece = f"<{type(value).__name__}>"
    out.append(piece)
    return budget - len(piece)
