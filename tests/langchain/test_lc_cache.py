"""MusubiCache with real LangChain objects: ChatOpenAI against the local server, fake models."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
import warnings
from typing import Any

import pytest
from langchain_core.globals import set_llm_cache
from langchain_core.language_models import FakeListChatModel, FakeListLLM
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from musubi_langchain import MusubiCache, MusubiLangChainWarning, instrument
from tests.support.openai_server import ChatReply, OpenAIServer, ToolCall
from tests.support.tamper import readdress

# Every test here runs on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_BACKENDS = True


def _chain(model: ChatOpenAI) -> Any:
    prompt = ChatPromptTemplate.from_messages(
        [("system", "You answer in one line."), ("human", "Tell me about {topic}")]
    )
    return prompt | model | StrOutputParser()


def test_chain_second_run_sends_zero_requests(db: str, chat: ChatOpenAI, openai_server: OpenAIServer) -> None:
    set_llm_cache(MusubiCache(db))
    chain = _chain(chat)
    first = chain.invoke({"topic": "musubi"})
    assert openai_server.chat_count == 1
    second = chain.invoke({"topic": "musubi"})
    assert second == first
    assert openai_server.chat_count == 1
    # A different input is a different node: it goes to the provider.
    chain.invoke({"topic": "sqlite"})
    assert openai_server.chat_count == 2
    # A fresh cache object on the same file (as a new process would build) still replays.
    set_llm_cache(MusubiCache(db))
    assert chain.invoke({"topic": "musubi"}) == first
    assert openai_server.chat_count == 2


def test_per_model_cache_field(db: str, openai_server: OpenAIServer) -> None:
    cache = MusubiCache(db)
    model = ChatOpenAI(model="gpt-4o-mini", base_url=openai_server.base_url, api_key="test",
                       max_retries=0, cache=cache)
    a = model.invoke("hello")
    b = model.invoke("hello")
    assert a.content == b.content
    assert openai_server.chat_count == 1
    # The same model without the cache field does not use it (no global cache is set).
    uncached = model.model_copy(update={"cache": None})
    uncached.invoke("hello")
    assert openai_server.chat_count == 2


def test_hits_return_fresh_lists_of_fresh_objects(db: str) -> None:
    cache = MusubiCache(db)
    model = FakeListChatModel(responses=["one"], cache=cache)
    model.invoke("q")
    prompt_llm = next(iter(cache._inflight), None)
    assert prompt_llm is None  # the miss was consumed by update()
    from langchain_core.load import dumps

    prompt = dumps([HumanMessage("q")])
    llm_string = model._get_llm_string(stop=None)
    hit1 = cache.lookup(prompt, llm_string)
    hit2 = cache.lookup(prompt, llm_string)
    assert isinstance(hit1, list) and isinstance(hit2, list)
    assert hit1 is not hit2 and hit1[0] is not hit2[0]
    hit1[0].message.content = "mutated"  # type: ignore[attr-defined]
    assert cache.lookup(prompt, llm_string)[0].message.content == "one"  # type: ignore[index,union-attr]


def test_tampered_entry_is_a_miss_with_one_warning(db: str) -> None:
    if db.startswith("postgresql://"):
        pytest.skip("edits the SQLite file (the PostgreSQL store is checked the same way by the core)")
    cache = MusubiCache(db)
    model = FakeListChatModel(responses=["real", "again", "third"], cache=cache)
    assert model.invoke("q").content == "real"
    cache.engine.flush()
    con = sqlite3.connect(db)
    rows = con.execute("SELECT artifact_id, encoding, payload FROM musubi_artifacts").fetchall()
    assert rows
    con.close()
    for artifact_id, _enc, payload in rows:
        text = payload.decode() if isinstance(payload, bytes) else payload
        # Point the stored message at a class outside the allow-list, under the edited
        # bytes' own content id (so it passes the content-id check: the allow-list refuses it).
        evil = text.replace('"ai"', '"langchain_community.llms.Evil"')
        assert evil != text
        readdress(db, artifact_id, payload=evil.encode())
    fresh = MusubiCache(db)
    # Same model parameters (FakeListChatModel keys on its responses), fresh iterator position.
    model2 = FakeListChatModel(responses=["real", "again", "third"], cache=fresh)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert model2.invoke("q").content == "real"  # recomputed by the model, not decoded
        assert model2.invoke("q").content == "real"  # the recomputation was stored again
        assert model2.invoke("other").content == "again"
    ours = [w for w in caught if issubclass(w.category, MusubiLangChainWarning)]
    assert len(ours) == 1
    assert "allow-listed" in str(ours[0].message)
    fresh.engine.flush()
    con = sqlite3.connect(db)
    payloads = [p for (p,) in con.execute("SELECT payload FROM musubi_artifacts")]
    con.close()
    assert any(b"Evil" not in bytes(p) and b'"real"' in bytes(p) for p in payloads)


# ---------------------------------------------------------------- agent loop


@tool
def get_weather(city: str) -> str:
    """Weather for a city."""
    return f"Sunny and 21C in {city} today"


def _agent_rule(body: dict[str, Any]) -> ChatReply:
    """Ask for the tool until a tool result is in the conversation, then answer.

    Tool-call ids are random per response (like a real provider), so replaying the second turn
    needs the canonical key to ignore them.
    """
    messages = body["messages"]
    if not any(m.get("role") == "tool" for m in messages):
        return ChatReply(tool_calls=[ToolCall("get_weather", {"city": "Paris"}, id=f"call_{uuid.uuid4().hex}")])
    result = next(m["content"] for m in messages if m.get("role") == "tool")
    return ChatReply(content=f"Final: {result}")


def _run_agent(model: ChatOpenAI) -> str:
    bound = model.bind_tools([get_weather])
    messages: list[Any] = [SystemMessage("Use tools."), HumanMessage("Weather in Paris?")]
    for _ in range(4):
        ai = bound.invoke(messages)
        messages.append(ai)
        if not ai.tool_calls:
            return str(ai.content)
        for call in ai.tool_calls:
            messages.append(get_weather.invoke(call))
    raise AssertionError("agent did not finish")


async def _arun_agent(model: ChatOpenAI) -> str:
    bound = model.bind_tools([get_weather])
    messages: list[Any] = [SystemMessage("Use tools."), HumanMessage("Weather in Paris?")]
    for _ in range(4):
        ai = await bound.ainvoke(messages)
        messages.append(ai)
        if not ai.tool_calls:
            return str(ai.content)
        for call in ai.tool_calls:
            messages.append(await get_weather.ainvoke(call))
    raise AssertionError("agent did not finish")


def test_tool_calling_agent_replays_fully_on_second_run(
    db: str, chat: ChatOpenAI, openai_server: OpenAIServer
) -> None:
    openai_server.set_chat_rule(_agent_rule)
    set_llm_cache(MusubiCache(db))
    first = _run_agent(chat)
    assert first == "Final: Sunny and 21C in Paris today"
    assert openai_server.chat_count == 2
    # LangChain's own key needs a third run to converge (total_cost marker, call ids);
    # musubi's canonical key replays every turn on the second run.
    assert _run_agent(chat) == first
    assert openai_server.chat_count == 2
    assert _run_agent(chat) == first
    assert openai_server.chat_count == 2


def test_async_chain_and_agent_replay(db: str, chat: ChatOpenAI, openai_server: OpenAIServer) -> None:
    openai_server.set_chat_rule(_agent_rule)
    set_llm_cache(MusubiCache(db))

    async def main() -> tuple[str, str, str, str]:
        a1 = await _arun_agent(chat)
        a2 = await _arun_agent(chat)
        c1 = await _chain(chat).ainvoke({"topic": "async"})
        c2 = await _chain(chat).ainvoke({"topic": "async"})
        return a1, a2, c1, c2

    a1, a2, c1, c2 = asyncio.run(main())
    assert a1 == a2 == "Final: Sunny and 21C in Paris today"
    assert c1 == c2
    assert openai_server.chat_count == 3  # two agent turns + one chain call, all once


def test_sync_and_async_share_nodes(db: str, chat: ChatOpenAI, openai_server: OpenAIServer) -> None:
    set_llm_cache(MusubiCache(db))
    sync = _chain(chat).invoke({"topic": "both"})
    assert asyncio.run(_chain(chat).ainvoke({"topic": "both"})) == sync
    assert openai_server.chat_count == 1


# ---------------------------------------------------------------- structured output


class Person(BaseModel):
    name: str
    age: int


def _structured_rule(body: dict[str, Any]) -> ChatReply:
    if body.get("tools"):
        name = body["tools"][0]["function"]["name"]
        return ChatReply(tool_calls=[ToolCall(name, {"name": "Ada", "age": 36}, id=f"call_{uuid.uuid4().hex}")])
    return ChatReply(content=json.dumps({"name": "Ada", "age": 36}))


@pytest.mark.parametrize("method", ["function_calling", "json_schema", "json_mode"])
def test_structured_output_round_trips(
    db: str, chat: ChatOpenAI, openai_server: OpenAIServer, method: str
) -> None:
    openai_server.set_chat_rule(_structured_rule)
    set_llm_cache(MusubiCache(db))
    structured = chat.with_structured_output(Person, method=method)  # type: ignore[arg-type]
    prompt = "Extract: Ada is 36. Respond in json."
    first = structured.invoke(prompt)
    assert first == Person(name="Ada", age=36)
    assert openai_server.chat_count == 1
    second = structured.invoke(prompt)
    assert isinstance(second, Person) and second == first
    assert openai_server.chat_count == 1
    # include_raw keeps the raw message (tool calls / parsed) intact on replay.
    raw = chat.with_structured_output(Person, method=method, include_raw=True)  # type: ignore[arg-type]
    r1 = raw.invoke(prompt)
    r2 = raw.invoke(prompt)
    assert r1["parsed"] == r2["parsed"] == first
    assert r2["raw"].tool_calls == r1["raw"].tool_calls
    assert openai_server.chat_count == 1  # include_raw sends the same request: same node


def test_structured_output_schema_change_is_a_new_key(db: str, chat: ChatOpenAI, openai_server: OpenAIServer) -> None:
    openai_server.set_chat_rule(_structured_rule)
    set_llm_cache(MusubiCache(db))

    class Person(BaseModel):  # same class name, different schema
        name: str
        age: int
        email: str | None = None

    chat.with_structured_output(Person, method="json_schema").invoke("Ada 36")
    assert openai_server.chat_count == 1
    chat.with_structured_output(globals()["Person"], method="json_schema").invoke("Ada 36")
    assert openai_server.chat_count == 2


# ---------------------------------------------------------------- text LLMs, TTL, clear


def test_text_llm_replays(db: str) -> None:
    cache = MusubiCache(db)
    llm = FakeListLLM(responses=["first", "second", "third"], cache=cache)
    assert llm.invoke("p") == "first"
    assert llm.invoke("p") == "first"  # replayed: the fake list did not advance
    assert llm.invoke("other") == "second"


def test_text_llm_per_call_kwargs_enter_the_key_under_instrument(db: str) -> None:
    instrument(db)
    llm = FakeListLLM(responses=["a", "b", "c"])
    assert llm.invoke("p", foo=1) == "a"
    assert llm.invoke("p", foo=1) == "a"
    # LangChain's own key ignores foo (langchain#40403); with instrument() it is a new node.
    assert llm.invoke("p", foo=2) == "b"


def test_ttl_expires_replays(db: str) -> None:
    cache = MusubiCache(db, ttl_seconds=0.2)
    model = FakeListChatModel(responses=["old", "new"], cache=cache)
    assert model.invoke("q").content == "old"
    assert model.invoke("q").content == "old"
    time.sleep(0.3)
    assert model.invoke("q").content == "new"


def test_clear_makes_entries_miss(db: str) -> None:
    cache = MusubiCache(db)
    model = FakeListChatModel(responses=["one", "two"], cache=cache)
    assert model.invoke("q").content == "one"
    cache.clear()
    assert model.invoke("q").content == "two"
    assert asyncio.run(model.ainvoke("q")).content == "two"
    asyncio.run(cache.aclear())
    assert model.invoke("q").content == "one"  # FakeListChatModel cycles


def test_namespaces_are_separate(db: str) -> None:
    a = FakeListChatModel(responses=["from-a"], cache=MusubiCache(db, namespace="a"))
    b = FakeListChatModel(responses=["from-b"], cache=MusubiCache(db, namespace="b"))
    assert a.invoke("q").content == "from-a"
    assert b.invoke("q").content == "from-b"


def test_messages_with_volatile_fields_key_the_same(db: str) -> None:
    cache = MusubiCache(db)
    model = FakeListChatModel(responses=["x", "y"], cache=cache)
    history_cold = [
        HumanMessage("hi", id="h1"),
        AIMessage("", tool_calls=[{"name": "f", "args": {"a": 1}, "id": "call_AAA"}],
                  usage_metadata={"input_tokens": 3, "output_tokens": 2, "total_tokens": 5},
                  response_metadata={"model_name": "m", "system_fingerprint": "fp1"}, id="run-1"),
        ToolMessage("result", tool_call_id="call_AAA"),
    ]
    history_warm = [
        HumanMessage("hi", id="h2"),
        AIMessage("", tool_calls=[{"name": "f", "args": {"a": 1}, "id": "call_BBB"}],
                  usage_metadata={"input_tokens": 3, "output_tokens": 2, "total_tokens": 5,
                                  "total_cost": 0},  # type: ignore[typeddict-unknown-key]
                  response_metadata={}, id="lc_run--other"),
        ToolMessage("result", tool_call_id="call_BBB"),
    ]
    assert model.invoke(history_cold).content == "x"
    assert model.invoke(history_warm).content == "x"
    # A different tool result is a different prompt.
    history_warm[2] = ToolMessage("other result", tool_call_id="call_BBB")
    assert model.invoke(history_warm).content == "y"
