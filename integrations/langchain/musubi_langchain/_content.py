"""Plain views of LangChain values: for node identity/artifacts, and "atoms" for data edges.

``to_plain`` turns run inputs/outputs (messages, documents, prompt values, pydantic models, ...)
into JSON-shaped data the core can hash and store, without ``repr`` (memory addresses) and without
pickling. ``atoms`` extracts the pieces of a value that can flow from one run into another
(strings, message contents, tool-call arguments, document texts): a run whose input contains an
atom that an earlier run in the same trace produced depends on that run. ``flow_atoms`` is the
callback handler's cheaper form: containers, messages and documents by identity (the object one
step returns is the object the next step gets), strings by content, and the content of tool-call
arguments (a tool gets a filtered copy of them).

Example:
    >>> from langchain_core.documents import Document
    >>> to_plain(Document(page_content="musubi ties things"))
    {'page_content': 'musubi ties things', 'metadata': {}}
    >>> sorted(atoms({"q": "what is musubi?"}))
    ['d:{"q": "what is musubi?"}', 's:what is musubi?']
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import enum
import json
import math
import uuid
from collections.abc import Hashable, Mapping
from typing import Any

from langchain_core.documents import Document
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGeneration, Generation, LLMResult
from langchain_core.prompt_values import ChatPromptValue, PromptValue, StringPromptValue
from pydantic import BaseModel

from musubi_core.record.preview import PREVIEW_CHARS, _text_attr, preview, storable_text

from ._keys import canonical_message_objects

# Strings shorter than this are too common ("yes", "ok", "1") to be evidence of a data flow.
MIN_ATOM_CHARS = 4
_MAX_DEPTH = 40


def _message(value: BaseMessage) -> dict[str, Any]:
    return canonical_message_objects([value])[0]


def to_plain(value: Any, _depth: int = 0) -> Any:
    """A deterministic JSON-shaped view of ``value`` (unknown objects become their type name)."""
    if value is None or type(value) in (bool, int, str):
        return value
    if isinstance(value, enum.Enum):
        return to_plain(value.value, _depth + 1)
    # str/int subclasses (LangChain's TextAccessor from StrOutputParser) are stored as the base
    # type: the core codec only round-trips exact types it knows.
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": str(value)}
    if _depth > _MAX_DEPTH:
        return {"truncated": type(value).__name__}
    d = _depth + 1
    if isinstance(value, BaseMessage):
        return _message(value)
    if isinstance(value, Document):
        return {"page_content": value.page_content, "metadata": to_plain(value.metadata, d)}
    if isinstance(value, PromptValue):
        return {"messages": [_message(m) for m in value.to_messages()]}
    if isinstance(value, LLMResult):
        return {"generations": [[to_plain(g, d) for g in gens] for gens in value.generations]}
    if isinstance(value, ChatGeneration):
        return {"message": _message(value.message)}
    if isinstance(value, Generation):
        return {"text": value.text}
    if isinstance(value, BaseModel):
        try:
            return to_plain(value.model_dump(mode="json"), d)
        except Exception:
            return {"object": type(value).__qualname__}
    if isinstance(value, Mapping):
        return {str(k): to_plain(v, d) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v, d) for v in value]
    if isinstance(value, (set, frozenset)):
        items = [to_plain(v, d) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True, default=str))
    if isinstance(value, bytes):
        return {"bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_plain({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, d)
    return {"object": f"{type(value).__module__}.{type(value).__qualname__}"}


def _add(out: set[str], value: Any, depth: int, plain: Any = None) -> None:
    if depth > _MAX_DEPTH:
        return
    d = depth + 1
    kind = type(value)
    if kind is str or isinstance(value, str):
        if len(value) >= MIN_ATOM_CHARS:
            out.add("s:" + value)
    elif kind is int or kind is bool or kind is float or value is None:
        return  # scalars carry no evidence; skip the type checks below
    elif kind is dict and plain is None and not value:
        return
    elif isinstance(value, BaseMessage):
        _add(out, value.content, d)
        for call in getattr(value, "tool_calls", None) or ():
            _add(out, call.get("args"), d)
    elif isinstance(value, Document):
        _add(out, value.page_content, d)
    elif isinstance(value, PromptValue):
        for m in value.to_messages():
            _add(out, m, d)
    elif isinstance(value, LLMResult):
        for gens in value.generations:
            for g in gens:
                _add(out, g, d)
    elif isinstance(value, ChatGeneration):
        _add(out, value.message, d)
    elif isinstance(value, Generation):
        _add(out, value.text, d)
    elif isinstance(value, BaseModel):
        try:
            _add(out, value.model_dump(mode="json"), d)
        except Exception:
            return
    elif isinstance(value, Mapping):
        if value:
            view = plain if plain is not None else to_plain(value)
            with contextlib.suppress(TypeError, ValueError):
                out.add("d:" + json.dumps(view, sort_keys=True, ensure_ascii=False))
        for v in value.values():
            _add(out, v, d)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _add(out, v, d)


def atoms(value: Any, plain: Any = None) -> set[str]:
    """The data-flow atoms of ``value`` (see module docstring); ``plain`` is ``to_plain(value)``
    when the caller already has it."""
    out: set[str] = set()
    _add(out, value, 0, plain)
    return out


def content_atom(out: set[Hashable], value: Any) -> None:
    """Add the content atom of a non-empty mapping (what a filtered copy of it still matches)."""
    if isinstance(value, Mapping) and value:
        with contextlib.suppress(TypeError, ValueError):
            out.add(("d", json.dumps(to_plain(value), sort_keys=True, ensure_ascii=False)))


# class -> -1 when it is no message class, else where its tool calls are: 1 a model field, 2
# some other attribute (a property), 0 nowhere but possibly an extra field (BaseMessage allows
# extras). isinstance against a pydantic class is slow, so this is decided once per class.
_MESSAGE_CLASSES: dict[type, int] = {}


def _message_class(cls: type) -> int:
    at = _MESSAGE_CLASSES.get(cls)
    if at is None:
        if not issubclass(cls, BaseMessage):
            at = -1
        else:
            at = 1 if "tool_calls" in cls.model_fields else 2 if hasattr(cls, "tool_calls") else 0
        if len(_MESSAGE_CLASSES) < 4096:
            _MESSAGE_CLASSES[cls] = at
    return at


def _tool_calls_at(message: BaseMessage, at: int) -> Any:
    if at == 1:
        return message.__dict__.get("tool_calls")
    if at == 2:
        return getattr(message, "tool_calls", None)
    extra = message.__pydantic_extra__
    return extra.get("tool_calls") if extra else None


def _tool_calls(message: BaseMessage) -> Any:
    """``getattr(message, "tool_calls", None)`` without pydantic's slow attribute miss."""
    cls = type(message)
    at = _MESSAGE_CLASSES.get(cls)
    return _tool_calls_at(message, at if at is not None else _message_class(cls))


# What _flow does with an object of a class (decided once per class, by the isinstance checks
# below it stands for): whether the object is an identity atom, and which branch walks it.
(
    _F_OTHER,
    _F_STR,
    _F_MESSAGE,
    _F_DOCUMENT,
    _F_CHAT_PROMPT,
    _F_STRING_PROMPT,
    _F_PROMPT,
    _F_RESULT,
    _F_CHAT_GENERATION,
    _F_GENERATION,
    _F_MODEL,
    _F_MAPPING,
    _F_SEQUENCE,
) = range(13)
_KEPT = (BaseMessage, Document, PromptValue, Generation, LLMResult, BaseModel, Mapping, list, tuple)
_FLOW_CLASSES: dict[type, tuple[int, bool]] = {}


def _flow_class(cls: type) -> tuple[int, bool]:
    found = _FLOW_CLASSES.get(cls)
    if found is not None:
        return found
    branch = _F_OTHER
    for base, b in (
        (str, _F_STR),
        (BaseMessage, _F_MESSAGE),
        (Document, _F_DOCUMENT),
        (ChatPromptValue, _F_CHAT_PROMPT),
        (StringPromptValue, _F_STRING_PROMPT),
        (PromptValue, _F_PROMPT),
        (LLMResult, _F_RESULT),
        (ChatGeneration, _F_CHAT_GENERATION),
        (Generation, _F_GENERATION),
        (BaseModel, _F_MODEL),
        (Mapping, _F_MAPPING),
        (list, _F_SEQUENCE),
        (tuple, _F_SEQUENCE),
    ):
        if issubclass(cls, base):
            branch = b
            break
    found = _FLOW_CLASSES[cls] = (branch, issubclass(cls, _KEPT))
    return found


def _flow(out: set[Hashable], keep: list[Any] | None, value: Any, depth: int) -> None:
    kind = type(value)
    if kind is str:
        if len(value) >= MIN_ATOM_CHARS:
            out.add(value)
        return
    if kind is int or kind is float or kind is bool or value is None or depth > _MAX_DEPTH:
        return  # scalars carry no evidence
    d = depth + 1
    if kind is dict or kind is list or kind is tuple:
        if value:
            if keep is not None:
                out.add(id(value))
                keep.append(value)
            for v in value.values() if kind is dict else value:
                _flow(out, keep, v, d)
        return
    branch, kept = _FLOW_CLASSES.get(kind) or _flow_class(kind)
    if branch == _F_STR:  # a str subclass (LangChain's TextAccessor) matches by content
        if len(value) >= MIN_ATOM_CHARS:
            out.add(str(value))
        return
    if keep is not None and kept:
        out.add(id(value))
        keep.append(value)
    if branch == _F_MESSAGE:
        _flow(out, keep, value.content, d)
        for call in _tool_calls(value) or ():
            args = call.get("args")
            _flow(out, keep, args, d)
            content_atom(out, args)
    elif branch == _F_DOCUMENT:
        _flow(out, keep, value.page_content, d)
    elif branch == _F_CHAT_PROMPT:
        _flow(out, keep, value.messages, d)
    elif branch == _F_STRING_PROMPT:
        _flow(out, keep, value.text, d)
    elif branch == _F_PROMPT:
        _flow(out, None, value.to_messages(), d)  # a new list each call: no identities
    elif branch == _F_RESULT:
        for gens in value.generations:
            for g in gens:
                _flow(out, keep, g, d)
    elif branch == _F_CHAT_GENERATION:
        _flow(out, keep, value.message, d)
    elif branch == _F_GENERATION:
        _flow(out, keep, value.text, d)
    elif branch == _F_MODEL:
        try:
            dumped = value.model_dump(mode="json")
        except Exception:
            return
        _flow(out, None, dumped, d)  # a new dict each call: no identities
    elif branch in (_F_MAPPING, _F_SEQUENCE):
        for v in value.values() if branch == _F_MAPPING else value:
            _flow(out, keep, v, d)


def flow_atoms(value: Any, keep: list[Any]) -> set[Hashable]:
    """The handler's data-flow atoms of ``value``: strings of at least ``MIN_ATOM_CHARS`` by
    content, non-empty containers, messages, documents, prompt values and generations by
    ``id()`` (each object is appended to ``keep``, which the caller holds while the ids are
    compared), and tool-call arguments by content too.

    >>> from langchain_core.messages import AIMessage
    >>> keep: list[Any] = []
    >>> msg = AIMessage("musubi ties things")
    >>> flow_atoms(msg, keep) == {id(msg), "musubi ties things"} and keep == [msg]
    True
    """
    out: set[Hashable] = set()
    _flow(out, keep, value, 0)
    return out


# ---------------------------------------------------------------------------------------------
# One read of a value: its preview and its flow atoms together (the callback handler's hot path).
# The common LangChain values (a flat dict, messages, a chat prompt, a str subclass) are read
# in one pass by a reader chosen once per class; every other value is read by ``preview`` and
# ``flow_atoms``. A fast reader gives exactly their answers: when a text it builds is longer
# than a preview, or an item is not one it knows, it hands the value to the generic reader.

Read = tuple[str | None, frozenset[Hashable]]
_NO_ATOMS: frozenset[Hashable] = frozenset()
_SIMPLE_LEAVES = (int, float, bool, type(None))


def _text(text: str) -> str:
    return text if text.isascii() else storable_text(text)


def _read_generic(value: Any, keep: list[Any]) -> Read:
    return preview(value), frozenset(flow_atoms(value, keep))


def _read_str_subclass(value: Any, keep: list[Any]) -> Read:
    # The atom is str(value), as _flow takes it; the preview shows its characters.
    atoms = frozenset((str(value),)) if len(value) >= MIN_ATOM_CHARS else _NO_ATOMS
    return preview(value[:]), atoms


def _read_dict(value: dict[Any, Any], keep: list[Any]) -> Read:
    """A dict of strings and scalars (a lambda's output, a prompt's variables)."""
    if not value:
        return "{}", _NO_ATOMS
    parts = []
    atoms: list[Hashable] = [id(value)]
    size = 1
    for k, v in value.items():
        kind = type(v)
        if kind is str:
            piece = repr(v)
            if len(v) >= MIN_ATOM_CHARS:
                atoms.append(v)
        elif kind in _SIMPLE_LEAVES:
            piece = str(v)
        else:
            return _read_generic(value, keep)
        piece = f"{k if isinstance(k, str) else type(k).__name__}: {piece}"
        parts.append(piece)
        size += len(piece) + 2
        if size > PREVIEW_CHARS:
            return _read_generic(value, keep)
    keep.append(value)
    return _text("{" + ", ".join(parts) + "}"), frozenset(atoms)


def _read_messages(messages: Any, holder: Any, keep: list[Any]) -> Read:
    """A list of messages with text content (a chat model's input), or a chat prompt's value
    (``holder``) that holds one: both preview as the list of their contents."""
    parts = []
    atoms: list[Hashable] = [id(messages)]
    size = 1
    for m in messages:
        cls = type(m)
        at = _MESSAGE_CLASSES.get(cls)
        if at is None:
            at = _message_class(cls)
        content = m.content if at >= 0 else None
        if type(content) is not str:
            return _read_generic(holder, keep)
        piece = repr(content)
        parts.append(piece)
        size += len(piece) + 2
        if size > PREVIEW_CHARS:
            return _read_generic(holder, keep)
        atoms.append(id(m))
        if len(content) >= MIN_ATOM_CHARS:
            atoms.append(content)
        calls = _tool_calls_at(m, at)
        if calls:
            out: set[Hashable] = set()
            for call in calls:
                args = call.get("args")
                _flow(out, keep, args, 2)
                content_atom(out, args)
            atoms.extend(out)
    keep.append(messages)
    keep.extend(messages)
    if holder is not messages:
        atoms.append(id(holder))
        keep.append(holder)
    return _text("[" + ", ".join(parts) + "]"), frozenset(atoms)


def _read_list(value: list[Any], keep: list[Any]) -> Read:
    if value and _message_class(type(value[0])) >= 0:
        return _read_messages(value, value, keep)
    return _read_generic(value, keep)


def _read_chat_prompt(value: ChatPromptValue, keep: list[Any]) -> Read:
    return _read_messages(value.messages, value, keep)


def _read_message(value: BaseMessage, keep: list[Any]) -> Read:
    content = value.content
    if type(content) is not str or _tool_calls(value):
        return _read_generic(value, keep)
    keep.append(value)
    text = preview(content[:PREVIEW_CHARS])  # as _render cuts it (no ellipsis)
    if len(content) >= MIN_ATOM_CHARS:
        return text, frozenset((id(value), content))
    return text, frozenset((id(value),))


_READERS: dict[type, Any] = {dict: _read_dict, list: _read_list}


def reader(cls: type) -> Any:
    """The reader of values of class ``cls`` (``reader(cls)(value, keep)`` is
    ``(preview(value), frozenset(flow_atoms(value, keep)))``)."""
    found = _READERS.get(cls)
    if found is not None:
        return found
    if issubclass(cls, str):
        found = _read_str_subclass
    elif issubclass(cls, ChatPromptValue):
        found = _read_chat_prompt
    elif issubclass(cls, BaseMessage) and _text_attr(cls) == "content":
        found = _read_message
    else:
        found = _read_generic
    if len(_READERS) < 4096:
        _READERS[cls] = found
    return found
