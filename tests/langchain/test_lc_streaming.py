"""Streaming: recorded as calls, and served from the store when the user opts in."""

from __future__ import annotations

import asyncio
from typing import Any

from langchain_core.globals import set_llm_cache
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessageChunk
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI
from test_lc_cache import _agent_rule, get_weather

from musubi_langchain import MusubiCache, MusubiCallbackHandler, instrument, uninstrument
from tests.support.openai_server import OpenAIServer
from tests.support.storedb import rows

# Runs on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_BACKENDS = True


def _chain(model: ChatOpenAI) -> Any:
    return ChatPromptTemplate.from_template("Stream about {topic}") | model | StrOutputParser()


def test_streams_are_recorded_as_calls_without_replay(db: str, chat: ChatOpenAI, openai_server: OpenAIServer) -> None:
    handler = MusubiCallbackHandler(db)
    text = "".join(_chain(chat).stream({"topic": "x"}, config={"callbacks": [handler]}))
    assert text.startswith("answer-")
    handler.flush()
    models = rows(db, "SELECT output_preview FROM musubi_calls WHERE kind = 'chat_model'")
    assert models == [(text,)]  # the final message, assembled from the chunks
    assert openai_server.requests[0].stream


def test_stream_replay_opt_in(db: str, chat: ChatOpenAI, openai_server: OpenAIServer) -> None:
    original = BaseChatModel.__dict__["stream"]
    instrument(db, replay_streams=True)
    assert BaseChatModel.__dict__["stream"] is not original
    chain = _chain(chat)
    cold = list(chain.stream({"topic": "x"}))
    assert len(cold) > 1  # the provider stream passed through chunk by chunk
    assert openai_server.chat_count == 1
    warm = list(chain.stream({"topic": "x"}))
    assert "".join(warm) == "".join(cold)
    assert openai_server.chat_count == 1
    # invoke and stream share the node.
    assert chain.invoke({"topic": "x"}) == "".join(cold)
    assert openai_server.chat_count == 1

    async def astream() -> str:
        return "".join([c async for c in chain.astream({"topic": "x"})])

    assert asyncio.run(astream()) == "".join(cold)
    assert openai_server.chat_count == 1
    uninstrument()
    assert BaseChatModel.__dict__["stream"] is original
    # Without the opt-in, streams bypass the cache as LangChain does.
    set_llm_cache(MusubiCache(db))
    list(chain.stream({"topic": "x"}))
    assert openai_server.chat_count == 2


def test_async_stream_miss_is_stored(db: str, chat: ChatOpenAI, openai_server: OpenAIServer) -> None:
    set_llm_cache(MusubiCache(db, replay_streams=True))
    chain = _chain(chat)

    async def run() -> str:
        return "".join([c async for c in chain.astream({"topic": "async"})])

    first = asyncio.run(run())
    assert asyncio.run(run()) == first
    assert chain.invoke({"topic": "async"}) == first
    assert openai_server.chat_count == 1


def test_streamed_tool_calls_replay(db: str, chat: ChatOpenAI, openai_server: OpenAIServer) -> None:
    openai_server.set_chat_rule(_agent_rule)
    set_llm_cache(MusubiCache(db, replay_streams=True))
    bound = chat.bind_tools([get_weather])

    def merged() -> AIMessageChunk:
        chunks = list(bound.stream("Weather in Paris?"))
        out = chunks[0]
        for c in chunks[1:]:
            out = out + c
        return out

    cold = merged()
    assert cold.tool_calls and cold.tool_calls[0]["args"] == {"city": "Paris"}
    warm = merged()
    assert warm.tool_calls[0]["name"] == "get_weather"
    assert warm.tool_calls[0]["args"] == {"city": "Paris"}
    assert openai_server.chat_count == 1
