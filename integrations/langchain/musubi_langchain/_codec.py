"""Allow-listed (de)serialisation of LangChain generations and messages.

Cache entries are stored as plain JSON-shaped dicts (the core codec stores those natively) and
rebuilt here through an explicit allow-list of classes. We never call ``langchain_core.load.loads``
on stored data: that would let whoever can write the SQLite file choose which classes get
constructed (and, with ``secrets_from_env``, read the environment). A tampered or unknown entry
raises :class:`EntryDecodeError`, which the cache turns into a miss plus one warning.

Example:
    >>> from langchain_core.messages import AIMessage
    >>> from langchain_core.outputs import ChatGeneration
    >>> data = encode_generations([ChatGeneration(message=AIMessage(content="hi"))])
    >>> decode_generations(data)[0].message.content
    'hi'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

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
from langchain_core.outputs import ChatGeneration, Generation
from pydantic import BaseModel

FORMAT_VERSION = 1

# The message classes a cache entry may rebuild, keyed by the message's ``type`` field.
# Chunks are stored as their full-message equivalent (see encode_message), so only the
# AI chunk needs an entry, for entries written by older formats or by hand.
_MESSAGE_TYPES: dict[str, type[BaseMessage]] = {
    "ai": AIMessage,
    "AIMessageChunk": AIMessageChunk,
    "human": HumanMessage,
    "system": SystemMessage,
    "tool": ToolMessage,
    "function": FunctionMessage,
    "chat": ChatMessage,
}


class EntryDecodeError(ValueError):
    """A stored entry is not something this adapter wrote (tampered, truncated or foreign)."""


def _plain(value: Any) -> Any:
    """Turn pydantic models nested in message fields (e.g. ``additional_kwargs["parsed"]``
    from structured output) into dicts, so the entry is plain JSON data.

    The structured-output parsers accept a dict there (``schema(**parsed)``), so a replayed
    message still parses into the user's model class without us ever naming that class.
    """
    if isinstance(value, BaseModel):
        return _plain(value.model_dump(mode="json"))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def encode_message(message: BaseMessage) -> dict[str, Any]:
    """Encode one message as a plain dict (chunks become their full-message form)."""
    if isinstance(message, AIMessageChunk):
        # Merged stream chunks are stored as the AIMessage a non-streamed call would return;
        # tool_call_chunks have already been parsed into tool_calls by the merge.
        message = AIMessage(
            content=message.content,
            additional_kwargs=message.additional_kwargs,
            response_metadata=message.response_metadata,
            name=message.name,
            id=message.id,
            tool_calls=message.tool_calls,
            invalid_tool_calls=message.invalid_tool_calls,
            usage_metadata=message.usage_metadata,
        )
    data = message.model_dump(mode="python")
    return {str(k): _plain(v) for k, v in data.items()}


def decode_message(data: Any) -> BaseMessage:
    """Rebuild a message from :func:`encode_message` output, allow-listed by ``type``."""
    if not isinstance(data, Mapping):
        raise EntryDecodeError("message entry is not a mapping")
    kind = data.get("type")
    cls = _MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise EntryDecodeError(f"message type {kind!r} is not allow-listed")
    try:
        return cls.model_validate(dict(data))
    except Exception as exc:  # pydantic ValidationError and friends
        raise EntryDecodeError(f"invalid {kind} message: {exc}") from exc


def encode_generations(generations: Sequence[Generation]) -> dict[str, Any]:
    """Encode a cache value (a sequence of generations) as a plain, versioned dict."""
    items: list[dict[str, Any]] = []
    for gen in generations:
        info = _plain(gen.generation_info) if gen.generation_info is not None else None
        if isinstance(gen, ChatGeneration):
            items.append(
                {"kind": "chat", "generation_info": info, "message": encode_message(gen.message)}
            )
        else:
            items.append({"kind": "text", "text": gen.text, "generation_info": info})
    return {"format": FORMAT_VERSION, "generations": items}


def decode_generations(data: Any) -> list[Generation]:
    """Rebuild a fresh ``list`` of fresh generations from :func:`encode_generations` output."""
    if not isinstance(data, Mapping) or data.get("format") != FORMAT_VERSION:
        raise EntryDecodeError("not a musubi_langchain cache entry")
    items = data.get("generations")
    if not isinstance(items, list) or not items:
        raise EntryDecodeError("cache entry has no generations")
    out: list[Generation] = []
    for item in items:
        if not isinstance(item, Mapping):
            raise EntryDecodeError("generation entry is not a mapping")
        info = item.get("generation_info")
        if info is not None and not isinstance(info, dict):
            raise EntryDecodeError("generation_info is not a mapping")
        kind = item.get("kind")
        try:
            if kind == "chat":
                out.append(
                    ChatGeneration(message=decode_message(item.get("message")), generation_info=info)
                )
            elif kind == "text":
                text = item.get("text")
                if not isinstance(text, str):
                    raise EntryDecodeError("text generation without text")
                out.append(Generation(text=text, generation_info=info))
            else:
                raise EntryDecodeError(f"generation kind {kind!r} is not allow-listed")
        except EntryDecodeError:
            raise
        except Exception as exc:
            raise EntryDecodeError(f"invalid generation: {exc}") from exc
    return out


def usage_of(generations: Sequence[Generation]) -> tuple[int | None, int | None]:
    """Sum input/output tokens over the generations' ``usage_metadata`` (None if unknown)."""
    tokens_in = tokens_out = 0
    seen = False
    for gen in generations:
        message = getattr(gen, "message", None)
        usage = getattr(message, "usage_metadata", None)
        if isinstance(usage, Mapping):
            seen = True
            tokens_in += int(usage.get("input_tokens") or 0)
            tokens_out += int(usage.get("output_tokens") or 0)
    return (tokens_in, tokens_out) if seen else (None, None)
