"""Stream replay for LangChain's v3 streaming protocol: ``model.stream_events(version="v3")``.

A chat model's v3 stream (``ChatModelStream``) never consults the cache in langchain-core 1.8:
its pump calls ``on_chat_model_start``, then drives ``_iter_v2_events`` (the provider's events,
each dispatched into the stream and fired as ``on_stream_event``), then ``on_llm_end``. With
stream replay installed (``MusubiCache(replay_streams=True)`` / ``instrument(replay_streams=
True)``), a v3 stream of a model whose cache opted in is marked when it is made, and its event
source is:

* a hit: the stored message's events (``message_to_events``), dispatched and fired exactly as
  the provider's would be; the lookup counts the replay and tells the handler, so the call is
  recorded as a replay and the events are not a live call;
* a miss: the provider's events, untouched; the assembled message is stored (under the key
  ``invoke`` uses) as soon as the stream finishes, before ``on_llm_end``.

Inside a graph streamed with ``stream_events(version="v3")``, a model is *invoked*: LangChain
itself consults the cache there, and replays a hit's events. That path needed a fix of a
different kind (``_codec.complete_usage``): see docs/langchain.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration

from ._patches import Patch
from .cache import MusubiCache

message_to_events: Any
amessage_to_events: Any
try:  # private helpers of langchain-core >= 1.8 (the v3 protocol)
    from langchain_core.language_models._compat_bridge import (
        amessage_to_events,
        message_to_events,
    )
except ImportError:  # pragma: no cover - no v3 protocol: nothing to patch
    message_to_events = amessage_to_events = None

__all__ = ["V3_PATCHES"]

_MARK = "_musubi_replay"


def _message(generations: Any) -> AIMessage | None:
    if isinstance(generations, list) and generations:
        message = getattr(generations[0], "message", None)
        if isinstance(message, AIMessage):
            return message
    return None


def _make_stream_v3(original: Any) -> Any:
    from .streaming import _cache_args, _replay_cache  # cycle: streaming installs these

    def _chat_model_stream_v3(
        self: BaseChatModel, input: Any, config: Any = None, *, stop: Any = None, **kwargs: Any
    ) -> Any:
        stream = original(self, input, config, stop=stop, **kwargs)
        cache = _replay_cache(self)
        if cache is not None:
            with contextlib.suppress(Exception):  # unmarked: the stream runs as LangChain's
                setattr(stream, _MARK, (cache, *_cache_args(self, input, stop, kwargs)))
        return stream

    return _chat_model_stream_v3


def _make_astream_v3(original: Any) -> Any:
    from .streaming import _cache_args, _replay_cache

    async def _achat_model_stream_v3(
        self: BaseChatModel, input: Any, config: Any = None, *, stop: Any = None, **kwargs: Any
    ) -> Any:
        stream = await original(self, input, config, stop=stop, **kwargs)
        cache = _replay_cache(self)
        if cache is not None:
            with contextlib.suppress(Exception):
                setattr(stream, _MARK, (cache, *_cache_args(self, input, stop, kwargs)))
        return stream

    return _achat_model_stream_v3


def _plan(stream: Any) -> tuple[MusubiCache, str, str] | None:
    plan = getattr(stream, _MARK, None)
    if plan is None or message_to_events is None:
        return None
    return plan  # type: ignore[no-any-return]


def _store(cache: MusubiCache, prompt: str, llm_string: str, stream: Any) -> None:
    message = getattr(stream, "output_message", None)
    if isinstance(message, AIMessage):
        cache.update(prompt, llm_string, [ChatGeneration(message=message)])


def _make_iter(original: Any) -> Any:
    def _iter_v2_events(
        self: BaseChatModel, messages: Any, *, run_manager: Any, stream: Any, **kwargs: Any
    ) -> Iterator[Any]:
        plan = _plan(stream)
        if plan is None:
            yield from original(self, messages, run_manager=run_manager, stream=stream, **kwargs)
            return
        cache, prompt, llm_string = plan
        if cache.would_replay(prompt, llm_string):
            message = _message(cache.lookup(prompt, llm_string))
            if message is not None:
                assert message_to_events is not None
                for event in message_to_events(message, message_id=stream.message_id):
                    stream.dispatch(event)
                    run_manager.on_stream_event(event)
                    yield event
                return
        stored = False
        for event in original(self, messages, run_manager=run_manager, stream=stream, **kwargs):
            if not stored:
                stored = True
                cache.begin_stream(prompt, llm_string)
            if stream.done:
                _store(cache, prompt, llm_string, stream)
            yield event

    return _iter_v2_events


def _make_aiter(original: Any) -> Any:
    async def _aiter_v2_events(
        self: BaseChatModel, messages: Any, *, run_manager: Any, stream: Any, **kwargs: Any
    ) -> AsyncIterator[Any]:
        plan = _plan(stream)
        if plan is None:
            async for event in original(
                self, messages, run_manager=run_manager, stream=stream, **kwargs
            ):
                yield event
            return
        cache, prompt, llm_string = plan
        if cache.would_replay(prompt, llm_string):
            message = _message(await cache.alookup(prompt, llm_string))
            if message is not None:
                assert amessage_to_events is not None
                async for event in amessage_to_events(message, message_id=stream.message_id):
                    stream.dispatch(event)
                    await run_manager.on_stream_event(event)
                    yield event
                return
        started = False
        async for event in original(
            self, messages, run_manager=run_manager, stream=stream, **kwargs
        ):
            if not started:
                started = True
                cache.begin_stream(prompt, llm_string)
            if stream.done:
                _store(cache, prompt, llm_string, stream)
            yield event

    return _aiter_v2_events


V3_PATCHES: tuple[Patch, ...] = (
    (
        Patch(BaseChatModel, "_chat_model_stream_v3", _make_stream_v3),
        Patch(BaseChatModel, "_achat_model_stream_v3", _make_astream_v3),
        Patch(BaseChatModel, "_iter_v2_events", _make_iter),
        Patch(BaseChatModel, "_aiter_v2_events", _make_aiter),
    )
    if all(
        hasattr(BaseChatModel, name)
        for name in ("_chat_model_stream_v3", "_achat_model_stream_v3", "_iter_v2_events",
                     "_aiter_v2_events")
    )
    and message_to_events is not None
    else ()
)
