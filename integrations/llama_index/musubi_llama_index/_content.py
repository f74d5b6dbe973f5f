"""What a LlamaIndex value carries, read cheaply: its texts (for flows between calls) and a
short preview (for a call's row).

Both walk values through one handler per *type*, chosen once per class (a dict lookup per
value after that): span arguments and results are the same few types every query, and
``hasattr`` on a pydantic model that lacks the attribute costs an exception each time.

* :func:`atoms` -- the texts a value carries (node contents, responses, messages, strings of
  at least :data:`MIN_ATOM` characters): a call whose input holds a text an earlier call of
  the same trace produced consumed that call's output.
* :func:`brief` -- at most :data:`~musubi_core.record.PREVIEW_CHARS` characters describing a
  value (never ``repr`` of an object: no addresses, no secrets of components).
* :func:`retrieved` -- the plain record of retrieved nodes (id, score, text) kept as a
  retriever call's artifact.

>>> from llama_index.core.schema import NodeWithScore, TextNode
>>> hit = NodeWithScore(node=TextNode(text="Musubi ties things together."), score=0.5)
>>> atoms({"nodes": [hit], "k": 2})
['Musubi ties things together.']
>>> brief({"query": "what is musubi?", "nodes": [hit]})
"{query: 'what is musubi?', nodes: ['Musubi ties things together.']}"
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, ChatResponse, CompletionResponse
from llama_index.core.base.response.schema import (
    AsyncStreamingResponse,
    PydanticResponse,
    Response,
    StreamingResponse,
)
from llama_index.core.prompts.base import BasePromptTemplate
from llama_index.core.schema import BaseComponent, BaseNode, NodeWithScore, QueryBundle, TextNode
from pydantic import BaseModel
from workflows.events import Event as WorkflowEvent  # llama-index-workflows, a core dependency

from musubi_core.record import PREVIEW_CHARS, preview

__all__ = [
    "MIN_ATOM",
    "atoms",
    "brief",
    "message_text",
    "prompt_text",
    "retrieved",
    "usage_of",
]

MIN_ATOM = 12  # shorter strings ("yes", "gpt-4o", ids) are not evidence of a flow
_MAX_ITEMS = 256
_MAX_DEPTH = 6
_MAX_FIELDS = 32


# ----------------------------------------------------------------------------- texts of objects
def _node_text(node: BaseNode) -> str:
    """A node's text (what ``get_content()`` returns; an LLM prompt shows it, with metadata
    prepended, so it is also found inside a prompt)."""
    return node.text if type(node) is TextNode else node.get_content()


def message_text(message: Any) -> str:
    """The text blocks of a ChatMessage, joined."""
    parts = [b.text for b in message.blocks if type(getattr(b, "text", None)) is str]
    return parts[0] if len(parts) == 1 else "\n".join(parts)


def _event_values(event: Any) -> list[Any]:
    """A workflow event's fields, its free-form attributes and (StopEvent) its result."""
    values = [getattr(event, name, None) for name in list(type(event).model_fields)[:_MAX_FIELDS]]
    private = getattr(event, "__pydantic_private__", None) or {}
    for value in private.values():
        if type(value) is dict:
            values.extend(list(value.values())[:_MAX_FIELDS])
        else:
            values.append(value)
    return values


def _model_values(value: Any) -> list[Any]:
    return [getattr(value, name, None) for name in list(type(value).model_fields)[:_MAX_FIELDS]]


def _response_text(value: Any) -> str | None:
    response = value.response
    return response if response is None or type(response) is str else str(response)


# How a value of one class is read, chosen once per class: its text (None: it has none) and
# the values inside it to walk on (None: nothing).
_Text = Callable[[Any], "str | None"]
_Inner = Callable[[Any], "list[Any] | None"]
_NONE: tuple[_Text | None, _Inner | None] = (None, None)


def _reader_for(cls: type) -> tuple[_Text | None, _Inner | None]:
    if issubclass(cls, NodeWithScore):
        return (lambda v: _node_text(v.node)), None
    if issubclass(cls, BaseNode):
        return _node_text, None
    if issubclass(cls, QueryBundle):
        return (lambda v: v.query_str), None
    if issubclass(cls, (Response, PydanticResponse)):
        return _response_text, None
    if issubclass(cls, (StreamingResponse, AsyncStreamingResponse)):
        return _NONE  # its text arrives later, through the model's end event
    if issubclass(cls, ChatResponse):
        return (lambda v: message_text(v.message)), None
    if issubclass(cls, CompletionResponse):
        return (lambda v: v.text), None
    if issubclass(cls, ChatMessage):
        return message_text, None
    if issubclass(cls, BasePromptTemplate):
        return _NONE  # a template is configuration, not data that flowed
    if issubclass(cls, WorkflowEvent):
        return None, _event_values
    if issubclass(cls, BaseComponent):
        return _NONE  # components (retrievers, synthesizers, ...) are not data
    if issubclass(cls, BaseModel):
        return None, _model_values  # plain results (StructuredRefineResponse)
    return _NONE


_READERS: dict[type, tuple[_Text | None, _Inner | None]] = {}


def _reader(cls: type) -> tuple[_Text | None, _Inner | None]:
    reader = _READERS.get(cls)
    if reader is None:
        reader = _READERS[cls] = _reader_for(cls)
    return reader


# ----------------------------------------------------------------------------- atoms
_PLAIN = frozenset({int, float, bool, type(None)})


def atoms(value: Any) -> list[str]:
    """The texts ``value`` carries (bounded; order of appearance; duplicates possible)."""
    out: list[str] = []
    if type(value) is str:
        if len(value) >= MIN_ATOM:
            out.append(value)
    elif type(value) not in _PLAIN:
        _atoms(value, out, 0)
    return out


def _atoms(value: Any, out: list[str], depth: int) -> None:
    """Append the texts of ``value`` (not a str, not a plain scalar) to ``out``."""
    cls = type(value)
    items: Any
    if cls is dict:
        items = value.values()
    elif cls is list or cls is tuple:
        if not value or type(value[0]) in _PLAIN:
            return  # empty, or a vector
        items = value if len(value) <= _MAX_ITEMS else value[:_MAX_ITEMS]
    else:
        text_of, inner = _reader(cls)
        try:
            if text_of is not None:
                text = text_of(value)
                if type(text) is str and len(text) >= MIN_ATOM:
                    out.append(text)
            if inner is None:
                return
            items = inner(value)
        except Exception:  # a value whose reader fails carries nothing we can match
            return
    if depth >= _MAX_DEPTH:
        return
    for item in items:
        kind = type(item)
        if kind is str:
            if len(item) >= MIN_ATOM:
                out.append(item)
        elif kind not in _PLAIN:
            _atoms(item, out, depth + 1)


# ----------------------------------------------------------------------------- previews
def brief(value: Any, limit: int = PREVIEW_CHARS) -> str | None:
    """At most ``limit`` characters describing ``value`` (None for None)."""
    if value is None or type(value) is str:
        return preview(value, limit)
    parts: list[str] = []
    _render(value, parts, limit, 0)
    return preview("".join(parts), limit)


def _render(value: Any, out: list[str], budget: int, depth: int) -> int:
    """Append text for ``value``; returns the budget left."""
    cls = type(value)
    if cls is str:
        piece = repr(value[:budget]) if depth else value[:budget]
    elif cls in _PLAIN:
        piece = str(value)
    elif cls is dict:
        out.append("{")
        budget -= 1
        first = True
        for k, v in value.items():
            if budget <= 0:
                break
            key = f"{k}: " if first else f", {k}: "
            first = False
            out.append(key)
            budget = _render(v, out, budget - len(key), depth + 1)
        out.append("}")
        return budget - 1
    elif cls is list or cls is tuple:
        if value and type(value[0]) is float:
            piece = f"<{len(value)} floats>"
        else:
            out.append("[")
            budget -= 1
            first = True
            for v in value:
                if budget <= 0:
                    break
                if not first:
                    out.append(", ")
                    budget -= 2
                first = False
                budget = _render(v, out, budget, depth + 1)
            out.append("]")
            return budget - 1
    elif depth > _MAX_DEPTH:
        piece = "…"
    else:
        text_of, inner = _reader(cls)
        text = None
        try:
            if text_of is not None:
                text = text_of(value)
            elif inner is not None:  # a data object: its class and what it holds
                head = f"{cls.__name__}("
                out.append(head)
                budget = _render(inner(value), out, budget - len(head), depth + 1)
                out.append(")")
                return budget - 1
        except Exception:
            text = None
        if type(text) is str:
            piece = repr(text[:budget]) if depth else text[:budget]
        else:
            piece = f"<{cls.__name__}>"
    out.append(piece)
    return budget - len(piece)


# ----------------------------------------------------------------------------- artifacts
def retrieved(result: Any) -> list[dict[str, Any]] | None:
    """What a retriever returned, as plain data (node id, score, text), or None when the
    result is not a list of scored nodes."""
    if type(result) is not list:
        return None
    out: list[dict[str, Any]] = []
    for item in result:
        if not isinstance(item, NodeWithScore):
            return None
        node = item.node
        score = item.score
        out.append(
            {
                "node_id": node.node_id,
                # as text: the artifact stays plain JSON (a float would be tagged)
                "score": f"{score:.6g}" if type(score) is float and math.isfinite(score) else None,
                "text": _node_text(node),
            }
        )
    return out


# ----------------------------------------------------------------------------- model requests
def prompt_text(payload: Any) -> str:
    """The text of a prompt or of a message list (what a prompt was formatted from appears
    inside it)."""
    if payload is None:
        return ""
    if isinstance(payload, str):
        return payload
    parts: list[str] = []
    try:
        for message in payload:
            for block in getattr(message, "blocks", ()):
                text = getattr(block, "text", None)
                if isinstance(text, str):
                    parts.append(text)
    except TypeError:
        return ""
    return "\n".join(parts)


def usage_of(response: Any) -> tuple[int | None, int | None]:
    """(prompt tokens, completion tokens) a chat or completion response reports."""
    raw = getattr(response, "raw", None)
    usage = raw.get("usage") if isinstance(raw, dict) else getattr(raw, "usage", None)
    if isinstance(usage, dict):
        p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
    else:
        p, c = getattr(usage, "prompt_tokens", None), getattr(usage, "completion_tokens", None)
    extra = getattr(response, "additional_kwargs", None) or {}
    p = p if isinstance(p, int) else extra.get("prompt_tokens")
    c = c if isinstance(c, int) else extra.get("completion_tokens")
    return (p if isinstance(p, int) else None, c if isinstance(c, int) else None)
