"""Allow-listed conversion of LlamaIndex LLM values to plain data and back.

Stored artifacts hold only plain dicts/lists/str/numbers; objects are rebuilt here from an
explicit allow-list of classes (``ChatMessage``, ``ChatResponse``, ``CompletionResponse``,
content blocks, ``LogProb``, OpenAI tool-call objects). A tampered store can therefore make a
replay fail to decode (the caller turns that into a miss), never construct arbitrary objects.

Example::

    data = dump_chat_response(resp)          # plain dict, codec-safe
    again = load_chat_response(data)         # a fresh ChatResponse
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    LogProb,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)

__all__ = [
    "DecodeFailure",
    "dump_chat_response",
    "dump_completion_response",
    "dump_message",
    "jsonable",
    "load_chat_response",
    "load_completion_response",
    "load_message",
]

# Content blocks we round-trip exactly. Anything else (images, audio, documents, citations)
# is rare in responses; it is stored as text when it has text, else dropped with a marker.
_BLOCKS: dict[str, type[Any]] = {
    "text": TextBlock,
    "tool_call": ToolCallBlock,
    "thinking": ThinkingBlock,
}


class DecodeFailure(ValueError):
    """A stored value does not have the shape this module writes (corrupt or foreign)."""


def jsonable(value: Any, _depth: int = 0) -> Any:
    """Best-effort conversion to JSON-safe plain data (for ``raw``/``additional_kwargs``)."""
    if _depth > 40:
        return None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, _depth + 1) for v in value]
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        try:
            return jsonable(dump(mode="json"), _depth + 1)
        except Exception:
            pass
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- tool calls
def _dump_tool_call(tc: Any) -> dict[str, Any]:
    """OpenAI tool call (object or dict) -> {"id", "type", "function": {"name", "arguments"}}."""
    if isinstance(tc, Mapping):
        fn = tc.get("function") or {}
        return {
            "id": tc.get("id"),
            "type": tc.get("type") or "function",
            "function": {"name": fn.get("name"), "arguments": fn.get("arguments")},
            **({"index": tc["index"]} if tc.get("index") is not None else {}),
        }
    fn = getattr(tc, "function", None)
    out: dict[str, Any] = {
        "id": getattr(tc, "id", None),
        "type": getattr(tc, "type", None) or "function",
        "function": {
            "name": getattr(fn, "name", None),
            "arguments": getattr(fn, "arguments", None),
        },
    }
    if getattr(tc, "index", None) is not None:
        out["index"] = tc.index
    return out


def _load_tool_call(data: Any) -> Any:
    """Rebuild an OpenAI tool-call object (what provider code reads attributes from)."""
    if not isinstance(data, Mapping) or not isinstance(data.get("function"), Mapping):
        raise DecodeFailure("tool call must be a mapping with a 'function' mapping")
    try:
        if "index" in data:
            from openai.types.chat.chat_completion_chunk import ChoiceDeltaToolCall

            return ChoiceDeltaToolCall.model_validate(dict(data))
        from openai.types.chat import ChatCompletionMessageToolCall

        clean = {k: v for k, v in data.items() if k != "index"}
        return ChatCompletionMessageToolCall.model_validate(clean)
    except ImportError:  # provider package absent: a plain dict is the portable form
        return dict(data)


# ----------------------------------------------------------------------------- messages
def _dump_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in kwargs.items():
        if k == "tool_calls" and isinstance(v, (list, tuple)):
            out[k] = {"__tool_calls__": [_dump_tool_call(tc) for tc in v]}
        else:
            out[str(k)] = jsonable(v)
    return out


def _load_kwargs(data: Any) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise DecodeFailure("additional_kwargs must be a mapping")
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, Mapping) and "__tool_calls__" in v:
            out[str(k)] = [_load_tool_call(tc) for tc in v["__tool_calls__"]]
        else:
            out[str(k)] = v
    return out


def dump_message(msg: ChatMessage) -> dict[str, Any]:
    """A ChatMessage as plain data (role, blocks, additional_kwargs)."""
    blocks: list[dict[str, Any]] = []
    for block in msg.blocks:
        kind = getattr(block, "block_type", None)
        if kind in _BLOCKS:
            blocks.append(jsonable(block.model_dump(mode="json")))
        elif isinstance(text := getattr(block, "text", None), str):
            blocks.append({"block_type": "text", "text": text})
        else:
            blocks.append({"block_type": "text", "text": f"[{kind} block not stored]"})
    return {
        "role": str(getattr(msg.role, "value", msg.role)),
        "blocks": blocks,
        "additional_kwargs": _dump_kwargs(msg.additional_kwargs),
    }


def load_message(data: Any) -> ChatMessage:
    """Rebuild a ChatMessage written by :func:`dump_message`."""
    if not isinstance(data, Mapping) or not isinstance(data.get("blocks"), list):
        raise DecodeFailure("message must be a mapping with a 'blocks' list")
    blocks = []
    for b in data["blocks"]:
        if not isinstance(b, Mapping) or b.get("block_type") not in _BLOCKS:
            raise DecodeFailure(f"block type not allowed: {b!r:.80}")
        blocks.append(_BLOCKS[str(b["block_type"])].model_validate(dict(b)))
    return ChatMessage(
        role=str(data.get("role", "assistant")),
        blocks=blocks,
        additional_kwargs=_load_kwargs(data.get("additional_kwargs") or {}),
    )


def _dump_logprobs(lp: Sequence[Sequence[LogProb]] | None) -> Any:
    if lp is None:
        return None
    return [[jsonable(p.model_dump(mode="json")) for p in row] for row in lp]


def _load_logprobs(data: Any) -> list[list[LogProb]] | None:
    if data is None:
        return None
    if not isinstance(data, list):
        raise DecodeFailure("logprobs must be a list")
    return [[LogProb.model_validate(p) for p in row] for row in data]


# ----------------------------------------------------------------------------- responses
def dump_chat_response(resp: ChatResponse) -> dict[str, Any]:
    """A ChatResponse as plain data. ``raw`` is kept as JSON (usage, model, ids)."""
    return {
        "type": "chat",
        "message": dump_message(resp.message),
        "raw": jsonable(resp.raw),
        "delta": resp.delta,
        "logprobs": _dump_logprobs(resp.logprobs),
        "additional_kwargs": _dump_kwargs(resp.additional_kwargs),
    }


def load_chat_response(data: Any, *, delta: str | None = None) -> ChatResponse:
    """Rebuild a fresh ChatResponse from :func:`dump_chat_response` output."""
    if not isinstance(data, Mapping) or data.get("type") != "chat":
        raise DecodeFailure("not a stored chat response")
    return ChatResponse(
        message=load_message(data["message"]),
        raw=data.get("raw"),
        delta=delta if delta is not None else data.get("delta"),
        logprobs=_load_logprobs(data.get("logprobs")),
        additional_kwargs=_load_kwargs(data.get("additional_kwargs") or {}),
    )


def dump_completion_response(resp: CompletionResponse) -> dict[str, Any]:
    """A CompletionResponse as plain data."""
    return {
        "type": "completion",
        "text": resp.text,
        "raw": jsonable(resp.raw),
        "delta": resp.delta,
        "logprobs": _dump_logprobs(resp.logprobs),
        "additional_kwargs": _dump_kwargs(resp.additional_kwargs),
    }


def load_completion_response(
    data: Any, *, text: str | None = None, delta: str | None = None
) -> CompletionResponse:
    """Rebuild a fresh CompletionResponse from :func:`dump_completion_response` output."""
    if not isinstance(data, Mapping) or data.get("type") != "completion":
        raise DecodeFailure("not a stored completion response")
    if not isinstance(data.get("text"), str):
        raise DecodeFailure("completion text must be a string")
    return CompletionResponse(
        text=text if text is not None else data["text"],
        raw=data.get("raw"),
        delta=delta if delta is not None else data.get("delta"),
        logprobs=_load_logprobs(data.get("logprobs")),
        additional_kwargs=_load_kwargs(data.get("additional_kwargs") or {}),
    )
