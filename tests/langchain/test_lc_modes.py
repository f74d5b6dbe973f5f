"""Modes of the LangChain adapter, with ChatOpenAI talking HTTP to the local server: replay
serves recordings (streams with no opt-in) and raises ReplayMissError out of the model call on a
miss, with nothing sent; off installs nothing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from langchain_core.globals import get_llm_cache
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI

import musubi_langchain
from musubi_core import ConfigError, Engine, ReplayMissError
from musubi_core.store import open_store
from musubi_langchain import MusubiCache
from tests.support.lineage import raw_bytes
from tests.support.openai_server import ChatReply, OpenAIServer, ToolCall
from tests.support.storedb import rows

# Runs on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_BACKENDS = True

TEMPLATE = "You are terse. Answer in one sentence using the context: {ctx}\nQuestion: {q}"
INPUT = {"ctx": "musubi ties knots", "q": "what does it tie?"}


def _chain(chat: ChatOpenAI, template: str = TEMPLATE) -> object:
    return ChatPromptTemplate.from_template(template) | chat | StrOutputParser()


def test_replay_serves_recordings_and_a_miss_names_the_changed_text(
    db: str, chat: ChatOpenAI, openai_server: OpenAIServer
) -> None:

    musubi_langchain.instrument(db)
    answer = _chain(chat).invoke(INPUT)  # type: ignore[attr-defined]
    musubi_langchain.uninstrument()
    sent = openai_server.count()

    musubi_langchain.instrument(db, mode="replay")
    assert _chain(chat).invoke(INPUT) == answer  # type: ignore[attr-defined]
    edited = TEMPLATE.replace("one sentence", "two sentences")
    with pytest.raises(ReplayMissError) as caught:
        _chain(chat, edited).invoke(INPUT)  # type: ignore[attr-defined]
    assert openai_server.count() == sent  # nothing reached the provider
    err = caught.value
    assert err.kind == "chat_model" and err.op_name == "chat_model:ChatOpenAI"
    assert err.model == "gpt-4o-mini" and err.reason == "input_changed"
    assert err.differences == [
        f'messages[0].content: "{TEMPLATE.format(**INPUT)}" -> "{edited.format(**INPUT)}"'
        .replace("\n", "\\n")
    ]
    assert "nothing was sent to the provider" in str(err)


def test_a_changed_model_parameter_is_named(db: str, openai_server: OpenAIServer) -> None:
    def model(temperature: float) -> ChatOpenAI:
        return ChatOpenAI(model="gpt-4o-mini", base_url=openai_server.base_url, api_key="test",
                          max_retries=0, temperature=temperature)

    musubi_langchain.instrument(db)
    _chain(model(0.0)).invoke(INPUT)  # type: ignore[attr-defined]
    musubi_langchain.instrument(db, mode="replay")
    with pytest.raises(ReplayMissError) as caught:
        _chain(model(0.2)).invoke(INPUT)  # type: ignore[attr-defined]
    assert openai_server.count() == 1
    assert caught.value.differences == ["model params.temperature: 0.0 -> 0.2"]
    assert caught.value.reason == "code_changed"


def test_streams_replay_without_opting_in_and_a_stream_miss_sends_nothing(
    db: str, chat: ChatOpenAI, openai_server: OpenAIServer
) -> None:
    musubi_langchain.instrument(db, replay_streams=True)  # record the stream
    streamed = "".join(_chain(chat).stream(INPUT))  # type: ignore[attr-defined]
    musubi_langchain.uninstrument()
    musubi_langchain.uninstall_stream_replay()
    sent = openai_server.count()

    musubi_langchain.instrument(db, mode="replay")  # no replay_streams=True
    assert "".join(_chain(chat).stream(INPUT)) == streamed  # type: ignore[attr-defined]

    async def astream() -> str:
        return "".join([c async for c in _chain(chat).astream(INPUT)])  # type: ignore[attr-defined]

    assert asyncio.run(astream()) == streamed
    with pytest.raises(ReplayMissError):
        "".join(_chain(chat).stream({**INPUT, "q": "and else?"}))  # type: ignore[attr-defined]
    assert openai_server.count() == sent


def test_tool_calls_replay_and_record_no_secret(
    db: str, openai_server: OpenAIServer
) -> None:
    openai_server.enqueue_chat(ChatReply(tool_calls=[ToolCall("add", {"a": 1, "b": 2},
                                                              id="call_random_1")]))
    chat = ChatOpenAI(model="gpt-4o-mini", base_url=openai_server.base_url,
                      api_key="sk-secret-never-stored", max_retries=0)

    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    model = chat.bind_tools([add])
    musubi_langchain.instrument(db)
    first = model.invoke("what is 1 + 2?")
    musubi_langchain.instrument(db, mode="replay")
    again = model.invoke("what is 1 + 2?")
    assert again.tool_calls == first.tool_calls and again.tool_calls[0]["args"] == {"a": 1, "b": 2}
    assert openai_server.count() == 1
    musubi_langchain.uninstrument()
    assert b"sk-secret-never-stored" not in raw_bytes(db)
    ((meta,),) = rows(db, "SELECT meta FROM musubi_nodes")
    assert json.loads(meta)["inputs"]["params"]["tools"][0]["function"]["name"] == "add"


def test_an_unreadable_store_in_replay_mode_sends_nothing(
    tmp_path: Path, chat: ChatOpenAI, openai_server: OpenAIServer
) -> None:
    broken = tmp_path / "not-a-store.db"
    broken.write_bytes(b"this is not a sqlite file" * 100)
    cache = MusubiCache(str(broken), mode="replay")
    model = chat.model_copy(update={"cache": cache})
    with pytest.raises(ReplayMissError, match="could not be read") as caught:
        model.invoke("hello")
    assert caught.value.reason == "store_error"
    assert openai_server.count() == 0


def test_off_installs_nothing_and_a_mode_must_agree_with_the_engine(
    db: str, chat: ChatOpenAI, openai_server: OpenAIServer
) -> None:
    before = get_llm_cache()
    inst = musubi_langchain.instrument(db, mode="off")
    assert inst.cache is None and inst.handler is None and get_llm_cache() is before
    chat.invoke("hello")
    chat.invoke("hello")
    assert openai_server.count() == 2 and not Path(db).exists()
    off = MusubiCache(db, mode="off")
    assert off.lookup("p", "[('_type', 'x')]") is None
    with Engine(open_store(db), mode="record") as engine, pytest.raises(ConfigError):
        MusubiCache(engine=engine, mode="replay")
