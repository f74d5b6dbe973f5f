"""Stream replay: ``.stream()`` / ``.astream()`` (and chains streaming through a model) served
from, and recorded into, a :class:`~musubi_langchain.MusubiCache` that opted in.

LangChain's ``BaseChatModel.stream`` never consults the cache (chat_models.py, "Caching is not
currently supported for streaming methods of models"). With the patch installed and a cache
created with ``replay_streams=True`` (or ``instrument(replay_streams=True)``):

* hit: the call goes through ``invoke`` (so callbacks, tracing and the lineage handler see a
  normal cached run) and the stored message is yielded as one final ``AIMessageChunk``;
* miss: the provider stream is passed through untouched, chunk by chunk, and the merged message
  is stored under the same key ``invoke`` would use, so a later invoke or stream replays it.

Example:
    >>> import os, tempfile
    >>> from langchain_core.language_models import GenericFakeChatModel
    >>> from langchain_core.messages import AIMessage
    >>> from musubi_langchain import MusubiCache
    >>> cache = MusubiCache(os.path.join(tempfile.mkdtemp(), "m.db"), replay_streams=True)
    >>> model = GenericFakeChatModel(messages=iter([AIMessage("a b c")]), cache=cache)
    >>> "".join(c.content for c in model.stream("hi"))  # provider stream, recorded
    'a b c'
    >>> "".join(c.content for c in model.stream("hi"))  # replayed (the iterator is exhausted)
    'a b c'
    >>> uninstall_stream_replay()
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.caches import BaseCache
from langchain_core.globals import get_llm_cache
from langchain_core.language_models import BaseChatModel
from langchain_core.load import dumps
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ToolCallChunk
from langchain_core.outputs import ChatGeneration

from ._patches import Patch
from .cache import MusubiCache

try:  # private helper; the key must match the one invoke() builds, which normalises first
    from langchain_core.language_models._utils import _normalize_messages
except ImportError:  # pragma: no cover - older/newer langchain-core

    def _normalize_messages(messages: Sequence[BaseMessage]) -> list[BaseMessage]:
        return list(messages)


_STRIP_KWARGS = ("ls_structured_output_format", "structured_output_format")


def _replay_cache(model: BaseChatModel) -> MusubiCache | None:
    # Same resolution as _generate_with_cache: False -> none, an instance -> it, else global.
    if model.cache is False:
        return None
    chosen = model.cache if isinstance(model.cache, BaseCache) else get_llm_cache()
    if isinstance(chosen, MusubiCache) and chosen.replay_streams:
        return chosen
    return None


def _cache_args(
    model: BaseChatModel, input: Any, stop: list[str] | None, kwargs: dict[str, Any]
) -> tuple[str, str]:
    """The ``(prompt, llm_string)`` that ``invoke`` would hand the cache for this call."""
    messages = model._convert_input(input).to_messages()
    normalized = [
        m.model_copy(update={"id": None}) if getattr(m, "id", None) is not None else m
        for m in _normalize_messages(messages)
    ]
    call_kwargs = {k: v for k, v in kwargs.items() if k not in _STRIP_KWARGS}
    return dumps(normalized), model._get_llm_string(stop=stop, **call_kwargs)


def _as_chunk(message: BaseMessage) -> AIMessageChunk:
    """The final streamed chunk for a replayed message (tool calls become tool-call chunks)."""
    if isinstance(message, AIMessageChunk):
        return message
    data = message.model_dump(exclude={"type", "tool_calls", "invalid_tool_calls"})
    usage = data.get("usage_metadata")
    if not (isinstance(usage, dict) and {"input_tokens", "output_tokens", "total_tokens"} <= set(usage)):
        # A hit of a message without usage gets LangChain's bare {"total_cost": 0}, which the
        # chunk class (rightly) rejects as incomplete usage.
        data["usage_metadata"] = None
    chunks = [
        ToolCallChunk(
            name=tc["name"], args=json.dumps(tc["args"]), id=tc.get("id"), index=i,
            type="tool_call_chunk",
        )
        for i, tc in enumerate(getattr(message, "tool_calls", None) or [])
    ]
    return AIMessageChunk(**data, tool_call_chunks=chunks, chunk_position="last")


def _merge(chunks: list[AIMessageChunk]) -> list[ChatGeneration]:
    merged = chunks[0]
    for c in chunks[1:]:
        merged = merged + c
    message = AIMessage(
        content=merged.content,
        additional_kwargs=merged.additional_kwargs,
        response_metadata=merged.response_metadata,
        id=merged.id,
        tool_calls=merged.tool_calls,
        invalid_tool_calls=merged.invalid_tool_calls,
        usage_metadata=merged.usage_metadata,
    )
    return [ChatGeneration(message=message)]


def _make_stream(original: Any) -> Any:
    def stream(
        self: BaseChatModel,
        input: Any,
        config: Any = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        cache = _replay_cache(self)
        if cache is None or not self._should_stream(async_api=False, **{**kwargs, "stream": True}):
            yield from original(self, input, config, stop=stop, **kwargs)
            return
        prompt, llm_string = _cache_args(self, input, stop, kwargs)
        if cache.would_replay(prompt, llm_string):
            message = self.invoke(input, config, stop=stop, **kwargs)
            yield _as_chunk(message)
            return
        chunks: list[AIMessageChunk] = []
        for chunk in original(self, input, config, stop=stop, **kwargs):
            if not chunks:
                cache.begin_stream(prompt, llm_string)
            chunks.append(chunk)
            yield chunk
        if chunks:
            cache.update(prompt, llm_string, _merge(chunks))

    return stream


def _make_astream(original: Any) -> Any:
    async def astream(
        self: BaseChatModel,
        input: Any,
        config: Any = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        cache = _replay_cache(self)
        if cache is None or not self._should_stream(async_api=True, **{**kwargs, "stream": True}):
            async for chunk in original(self, input, config, stop=stop, **kwargs):
                yield chunk
            return
        prompt, llm_string = _cache_args(self, input, stop, kwargs)
        if cache.would_replay(prompt, llm_string):
            message = await self.ainvoke(input, config, stop=stop, **kwargs)
            yield _as_chunk(message)
            return
        chunks: list[AIMessageChunk] = []
        async for chunk in original(self, input, config, stop=stop, **kwargs):
            if not chunks:
                cache.begin_stream(prompt, llm_string)
            chunks.append(chunk)
            yield chunk
        if chunks:
            cache.update(prompt, llm_string, _merge(chunks))

    return astream


def _patches() -> tuple[Patch, ...]:
    from .streaming_v3 import V3_PATCHES  # v3 streams (stream_events(version="v3")) too

    return (
        Patch(BaseChatModel, "stream", _make_stream),
        Patch(BaseChatModel, "astream", _make_astream),
        *V3_PATCHES,
    )


_PATCHES = _patches()


def install_stream_replay() -> None:
    """Patch ``BaseChatModel.stream``/``astream`` and the v3 stream (``stream_events(version=
    "v3")``, see :mod:`musubi_langchain.streaming_v3`) (idempotent). Inert for calls whose
    cache is not a ``MusubiCache(replay_streams=True)``."""
    for p in _PATCHES:
        p.install()


def uninstall_stream_replay() -> None:
    """Restore LangChain's own ``stream``/``astream`` and v3 stream."""
    for p in _PATCHES:
        p.uninstall()


def stream_replay_installed() -> bool:
    return all(p.installed for p in _PATCHES)


__all__ = ["install_stream_replay", "stream_replay_installed", "uninstall_stream_replay"]
