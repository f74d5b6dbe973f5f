"""Canonical node keys for LangChain model calls.

LangChain hands a cache ``(prompt, llm_string)``: the prompt is ``dumps(messages)`` (JSON without
sorted keys, carrying usage/response metadata and provider tool-call ids of earlier turns) and the
llm string is JSON of the model plus a Python ``repr`` of the call kwargs. Used verbatim as a key,
a multi-turn agent only converges on its third run (a hit adds ``total_cost: 0`` to the message,
which changes the next turn's prompt), structured-output keys name a class instead of its schema,
and reprs with memory addresses never hit again. Here both halves are parsed and reduced to the
fields that decide the answer; the core then hashes them with its type-tagged canonical JSON.

Example:
    >>> from langchain_core.load import dumps
    >>> from langchain_core.messages import HumanMessage
    >>> parts = chat_key_parts(dumps([HumanMessage("hi")]), "[('_type', 'fake'), ('stop', None)]")
    >>> parts.op_name, parts.inputs["messages"]
    ('chat_model:fake', [{'type': 'human', 'content': 'hi'}])
"""

from __future__ import annotations

import ast
import functools
import json
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from langchain_core.load import dumpd
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from pydantic import BaseModel

# Message fields that never decide the answer: ids, token/cost accounting (a cache hit adds
# ``total_cost: 0`` here), provider metadata, and LangChain-internal streaming markers.
_VOLATILE_MESSAGE_FIELDS = frozenset(
    {"id", "usage_metadata", "response_metadata", "chunk_position", "artifact", "example"}
)
# additional_kwargs entries derived from other fields (``tool_calls`` duplicates the parsed tool
# calls with their provider ids; ``parsed`` is derived from the content).
_DERIVED_ADDITIONAL_KWARGS = frozenset({"tool_calls", "parsed"})
# Model fields that change transport, retries or bookkeeping, never the completion.
_VOLATILE_MODEL_FIELDS = frozenset(
    {
        "max_retries",
        "request_timeout",
        "timeout",
        "stream_usage",
        "streaming",
        "disable_streaming",
        "http_client",
        "http_async_client",
        "default_headers",
        "default_query",
        "openai_proxy",
        "verbose",
        "callbacks",
        "callback_manager",
        "tags",
        "metadata",
        "cache",
        "rate_limiter",
        "custom_get_token_ids",
        "stream_chunk_timeout",
    }
)
_CLASS_TOKEN = "\x00musubi-class:"
_OBJ_TOKEN = "\x00musubi-object:"
_CLASS_REPR = re.compile(r"<class '([\w.]+)'>")
_OBJECT_REPR = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")
_CALLABLE_REPR = re.compile(r"<(?:bound method|function|built-in function) ([\w.<>]+)(?: of [^>]*)? at 0x[0-9a-fA-F]+>")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class KeyParts(NamedTuple):
    """What the core's ``engine.key(op_name, inputs, fingerprint=...)`` is called with."""

    op_name: str
    fingerprint: Any
    inputs: dict[str, Any]


# --------------------------------------------------------------------------- messages


def _unescape(value: Any) -> Any:
    """Undo ``dumps``' escaping of user dicts that contain an ``lc`` key."""
    if isinstance(value, Mapping):
        if set(value) == {"__lc_escaped__"}:
            return _unescape(value["__lc_escaped__"])
        return {k: _unescape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unescape(v) for v in value]
    return value


def _is_empty(value: Any) -> bool:
    return value is None or value == [] or value == {} or value == ""


class _ToolCallIds:
    """Replaces provider tool-call ids (``call_...``) with positional aliases.

    The ids are random per provider response, so a cold run and its replay would differ in every
    later turn; aliasing keeps which tool result answers which call without the random part.
    """

    def __init__(self) -> None:
        self._aliases: dict[str, str] = {}

    def alias(self, value: Any) -> Any:
        if not isinstance(value, str) or not value:
            return None
        if value not in self._aliases:
            self._aliases[value] = f"tc{len(self._aliases)}"
        return self._aliases[value]


def _canonical_tool_call(call: Any, ids: _ToolCallIds) -> Any:
    if not isinstance(call, Mapping):
        return call
    out = {k: v for k, v in call.items() if k not in ("id", "index", "type") and v is not None}
    if call.get("id"):
        out["id"] = ids.alias(call["id"])
    return out


def _canonical_content(content: Any, ids: _ToolCallIds) -> Any:
    if not isinstance(content, list):
        return content
    blocks: list[Any] = []
    for block in content:
        if not isinstance(block, Mapping):
            blocks.append(block)
            continue
        # Block ids are provider message/tool ids and ``index`` is a streaming artefact.
        out = {k: v for k, v in block.items() if k not in ("id", "index")}
        if block.get("type") in ("tool_use", "tool_call", "function_call") and block.get("id"):
            out["id"] = ids.alias(block["id"])
        for ref in ("tool_use_id", "call_id"):
            if ref in out:
                out[ref] = ids.alias(out[ref])
        blocks.append(out)
    return blocks


def _canonical_message(raw: Any, ids: _ToolCallIds, *, escaped: bool = True) -> dict[str, Any]:
    if isinstance(raw, Mapping) and raw.get("lc") == 1 and "kwargs" in raw:
        kwargs = dict(raw["kwargs"])
        ident = raw.get("id")
        cls_name = ident[-1] if isinstance(ident, list) and ident else None
    elif isinstance(raw, Mapping):
        kwargs, cls_name = dict(raw), None
    else:
        return {"type": "unknown", "content": raw}
    if escaped:  # plain data from _fast_dumpd has nothing escaped
        kwargs = _unescape(kwargs)
    msg_type = kwargs.pop("type", None) or cls_name or "unknown"
    if isinstance(msg_type, str) and msg_type.endswith("Chunk"):
        # A streamed message (AIMessageChunk) and its invoked twin must key the same.
        msg_type = {"AIMessageChunk": "ai"}.get(msg_type, msg_type)
    out: dict[str, Any] = {"type": msg_type, "content": _canonical_content(kwargs.pop("content", ""), ids)}
    for key, value in sorted(kwargs.items()):
        if key in _VOLATILE_MESSAGE_FIELDS or key == "tool_call_chunks":
            continue
        if key in ("tool_calls", "invalid_tool_calls") and isinstance(value, list):
            value = [_canonical_tool_call(c, ids) for c in value]
        elif key == "tool_call_id":
            value = ids.alias(value)
        elif key == "status" and value == "success":
            continue
        elif key == "additional_kwargs" and isinstance(value, Mapping):
            value = {
                k: v
                for k, v in value.items()
                if k not in _DERIVED_ADDITIONAL_KWARGS and not _is_empty(v)
            }
        if not _is_empty(value):
            out[key] = value
    return out


def canonical_messages(raw_messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Canonical form of a list of LC-serialised messages (``dumpd`` dicts)."""
    ids = _ToolCallIds()
    return [_canonical_message(m, ids) for m in raw_messages]


def _is_plain(value: Any) -> bool:
    """JSON data that ``dumpd`` passes through unchanged (no tuples, objects, ``lc`` keys)."""
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return True
    if kind is list:
        return all(_is_plain(v) for v in value)
    if kind is dict:
        return all(
            type(k) is str and k != "lc" and k != "__lc_escaped__" and _is_plain(v)
            for k, v in value.items()
        )
    return False


# Message classes whose ``dumpd`` form the fast path reproduces (no secrets; ``lc_attributes``
# only for the AI messages, mirroring their tool calls).
_FAST_MESSAGES = frozenset(
    {AIMessage, AIMessageChunk, HumanMessage, SystemMessage, ToolMessage, ChatMessage, FunctionMessage}
)
_AI_MESSAGES = frozenset({AIMessage, AIMessageChunk})
# class -> (lc id, ((field, required, default), ...)) for the fields ``to_json`` considers.
_FIELD_INFO: dict[type, tuple[list[str], tuple[tuple[str, bool, Any], ...]]] = {}


def _field_info(cls: type[BaseMessage]) -> tuple[list[str], tuple[tuple[str, bool, Any], ...]]:
    info = _FIELD_INFO.get(cls)
    if info is None:
        fields = tuple(
            (name, field.is_required(), None if field.is_required() else field.get_default(call_default_factory=True))
            for name, field in cls.model_fields.items()
            if not field.exclude
        )
        info = _FIELD_INFO[cls] = (list(cls.lc_id()), fields)
    return info


def _fast_dumpd(message: BaseMessage) -> dict[str, Any] | None:
    """``dumpd(message)`` without LangChain's generic serialiser, for plain-data messages.

    Same kwargs as ``Serializable.to_json`` (required fields, truthy fields, falsy fields that
    differ from their default, then ``lc_attributes``); None when anything is not plain data,
    so the caller takes the ``dumpd`` path and the key never depends on which path ran.
    """
    cls = type(message)
    if cls not in _FAST_MESSAGES:
        return None
    ident, fields = _field_info(cls)
    values = message.__dict__
    kwargs: dict[str, Any] = {}
    for name, required, default in fields:
        if name not in values:
            continue
        value = values[name]
        if not _is_plain(value):
            return None
        if required or value or value != default:
            kwargs[name] = value
    if cls in _AI_MESSAGES:
        for name in ("tool_calls", "invalid_tool_calls"):
            if not _is_plain(values.get(name)):
                return None
            kwargs[name] = values.get(name)
    return {"lc": 1, "type": "constructor", "id": ident, "kwargs": kwargs}


# Messages whose canonical form, when their content is a string and they carry no
# additional_kwargs, is just their type, content and name (every other field is volatile).
_SIMPLE_MESSAGES = frozenset({HumanMessage, SystemMessage})
_SIMPLE_FIELDS = frozenset({"content", "additional_kwargs", "response_metadata", "type", "name", "id"})


def _simple_canonical(message: BaseMessage) -> dict[str, Any] | None:
    """``_canonical_message(_fast_dumpd(message))`` for a plain human/system message (the
    prompt's usual output), without building its serialised form; None for anything else."""
    values = message.__dict__
    content = values.get("content")
    if type(content) is not str or values.get("additional_kwargs") or len(values) != 6:
        return None
    kind = values.get("type")
    name = values.get("name")
    if type(kind) is not str or not kind or not (name is None or type(name) is str):
        return None
    if not _SIMPLE_FIELDS.issuperset(values):
        return None
    if kind.endswith("Chunk"):
        return None
    out: dict[str, Any] = {"type": kind, "content": content}
    if name:
        out["name"] = name
    return out


def canonical_message_objects(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """Canonical form of message objects (the handler's view of a chat-model input)."""
    ids = _ToolCallIds()
    out = []
    for m in messages:
        if type(m) in _SIMPLE_MESSAGES:
            simple = _simple_canonical(m)
            if simple is not None:
                out.append(simple)
                continue
        raw = _fast_dumpd(m)
        if raw is None:
            out.append(_canonical_message(dumpd(m), ids))
        else:
            out.append(_canonical_message(raw, ids, escaped=False))
    return out


# --------------------------------------------------------------------------- llm string


def _resolve_class(name: str) -> Any:
    """Identity of a class named in a repr: its JSON schema when it is a pydantic model.

    Only modules already in ``sys.modules`` are consulted: building a key never imports code.
    The schema (not the repr) is what decides the answer, so editing the model's fields changes
    the key, and ``__main__.Answer`` vs ``app.models.Answer`` key the same.
    """
    module_name, _, qualname = name.rpartition(".")
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None) if obj is not None else None
    if isinstance(obj, type) and issubclass(obj, BaseModel):
        try:
            return {"pydantic_schema": obj.model_json_schema()}
        except Exception:
            return {"class": qualname}
    return {"class": qualname}


def _detokenise(value: Any) -> Any:
    if isinstance(value, str):
        if value.startswith(_CLASS_TOKEN):
            return _resolve_class(value[len(_CLASS_TOKEN) :])
        if value.startswith(_OBJ_TOKEN):
            return {"object": value[len(_OBJ_TOKEN) :]}
        return value
    if isinstance(value, Mapping):
        return {str(k): _detokenise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_detokenise(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_detokenise(v) for v in value), key=repr)
    return value


def _literal(text: str) -> Any:
    """Parse a Python repr of call params without evaluating code.

    ``ast.literal_eval`` handles the common case; reprs of classes, objects and functions are
    replaced by tokens first (their memory addresses never enter the key). If the text still
    does not parse, the address-free text itself is the key material.
    """
    try:
        return _detokenise(ast.literal_eval(text))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    subst = _CLASS_REPR.sub(lambda m: repr(_CLASS_TOKEN + m.group(1)), text)
    subst = _OBJECT_REPR.sub(lambda m: repr(_OBJ_TOKEN + m.group(1)), subst)
    subst = _CALLABLE_REPR.sub(lambda m: repr(_OBJ_TOKEN + m.group(1)), subst)
    try:
        return _detokenise(ast.literal_eval(subst))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return {"unparsed": _ADDRESS.sub("", text)}


def _params_dict(parsed: Any) -> dict[str, Any]:
    """``[('stop', None), ('tools', [...])]`` -> ``{'tools': [...]}`` (None values dropped)."""
    if isinstance(parsed, list) and all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in parsed
    ):
        return {k: v for k, v in parsed if v is not None}
    return {"params": parsed}


def _model_fingerprint(model: Mapping[str, Any]) -> dict[str, Any]:
    ident = model.get("id")
    cls = ".".join(str(p) for p in ident) if isinstance(ident, list) else str(model.get("name"))
    kwargs = model.get("kwargs")
    params: dict[str, Any] = {}
    if isinstance(kwargs, Mapping):
        for key, value in kwargs.items():
            if key in _VOLATILE_MODEL_FIELDS:
                continue
            if isinstance(value, Mapping) and value.get("type") == "secret":
                continue  # api keys: never identity, not even the env var's name
            params[key] = value
    return {"class": cls, "params": params}


class ParsedLLMString(NamedTuple):
    model_class: str
    fingerprint: dict[str, Any]
    call_params: dict[str, Any]


@functools.lru_cache(maxsize=512)
def parse_llm_string(llm_string: str) -> ParsedLLMString:
    """Split and canonicalise an ``llm_string`` (memoised: the same model sends the same one).

    Callers must treat the result as read-only.
    """
    text = llm_string.strip()
    if text.startswith("{"):
        try:
            model, end = json.JSONDecoder().raw_decode(text)
        except ValueError:
            model, end = None, 0
        rest = text[end:]
        if isinstance(model, Mapping) and rest.startswith("---"):
            fp = _model_fingerprint(model)
            cls = fp["class"].rsplit(".", 1)[-1]
            return ParsedLLMString(cls, fp, _params_dict(_literal(rest[3:])))
    # Non-serialisable models (and every BaseLLM): one repr of sorted params incl. ``_type``.
    params = _params_dict(_literal(text))
    model_type = str(params.pop("_type", "unknown"))
    call = {k: params.pop(k) for k in ("stop",) if k in params}
    fp = {"class": model_type, "params": {k: v for k, v in params.items() if k not in _VOLATILE_MODEL_FIELDS}}
    return ParsedLLMString(model_type, fp, call)


def chat_key_parts(prompt: str, llm_string: str) -> KeyParts:
    """Key parts for a chat-model cache entry."""
    try:
        raw = json.loads(prompt)
    except ValueError:
        raw = None
    messages = canonical_messages(raw) if isinstance(raw, list) else [{"raw": prompt}]
    parsed = parse_llm_string(llm_string)
    return KeyParts(
        f"chat_model:{parsed.model_class}",
        parsed.fingerprint,
        {"messages": messages, "params": parsed.call_params},
    )


def llm_key_parts(prompt: str, llm_string: str, call_kwargs: Mapping[str, Any] | None) -> KeyParts:
    """Key parts for a text-completion (``BaseLLM``) cache entry.

    LangChain leaves per-call kwargs out of an LLM's ``llm_string`` (langchain#40403); when
    :func:`musubi_langchain.instrument` is active they are captured and passed in here.
    """
    parsed = parse_llm_string(llm_string)
    params = dict(parsed.call_params)
    if call_kwargs:
        params["call_kwargs"] = _detokenise(dict(call_kwargs))
    return KeyParts(f"llm:{parsed.model_class}", parsed.fingerprint, {"prompt": prompt, "params": params})
