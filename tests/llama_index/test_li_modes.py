"""Modes of the LlamaIndex adapter, with the real OpenAI / OpenAIEmbedding classes talking HTTP
to the local server: replay serves recordings (streams included) and raises ReplayMissError
from the model call on a miss, nothing sent; through a query engine and a FunctionAgent the
error reaches the caller; off installs nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from llama_index.core import VectorStoreIndex
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.tools import FunctionTool

from musubi_core import ReplayMissError
from musubi_llama_index import instrument, is_instrumented, uninstrument
from tests.support.openai_server import ChatReply, OpenAIServer, ToolCall

# Runs on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_BACKENDS = True


def _query(documents: list[Any], llm: Any, embed_model: Any, question: str, *,
           streaming: bool = False) -> str:
    index = VectorStoreIndex.from_documents(documents, embed_model=embed_model)
    engine = index.as_query_engine(llm=llm, streaming=streaming, similarity_top_k=2)
    response = engine.query(question)
    return "".join(response.response_gen) if streaming else str(response)  # type: ignore[union-attr]


def test_a_query_engine_replays_and_a_miss_reaches_the_caller(
    openai_server: OpenAIServer, db_path: str, llm: Any, embed_model: Any, documents: list[Any]
) -> None:
    instrument(db_path, llm=llm, embed_model=embed_model)
    answer = _query(documents, llm, embed_model, "Where does the lineage live?")
    streamed = _query(documents, llm, embed_model, "What is musubi?", streaming=True)
    uninstrument()
    sent = openai_server.count()

    instrument(db_path, llm=llm, embed_model=embed_model, mode="replay")
    assert _query(documents, llm, embed_model, "Where does the lineage live?") == answer
    assert _query(documents, llm, embed_model, "What is musubi?", streaming=True) == streamed
    with pytest.raises(ReplayMissError) as caught:
        _query(documents, llm, embed_model, "Where does the lineage live now?")
    assert openai_server.count() == sent
    err = caught.value  # the question's embedding is the first call that misses
    assert err.kind == "embedding" and err.op_name == "llama_index.embedding"
    assert err.differences == ['text: "Where does the lineage live?" -> "Where does the lineage live now?"']


def test_an_llm_miss_names_the_changed_message_and_parameter(
    openai_server: OpenAIServer, db_path: str, llm: Any
) -> None:
    instrument(db_path, llm=llm)
    llm.chat([ChatMessage(role="user", content="Name a knot.")])
    uninstrument()
    warmer = llm.model_copy(update={"temperature": 0.7})
    instrument(db_path, llm=warmer, mode="replay")
    with pytest.raises(ReplayMissError) as caught:
        warmer.chat([ChatMessage(role="user", content="Name two knots.")])
    assert openai_server.count() == 1
    assert caught.value.kind == "llm" and caught.value.model == "gpt-4o-mini"
    assert caught.value.differences == [
        'input[0].blocks[0].text: "Name a knot." -> "Name two knots."',
        "model params.temperature: 0.1 -> 0.7",
    ]


def test_a_function_agent_surfaces_the_miss(
    openai_server: OpenAIServer, db_path: str, llm: Any
) -> None:
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    openai_server.enqueue_chat(
        ChatReply(tool_calls=[ToolCall("add", {"a": 2, "b": 3}, id="call_1")]),
        ChatReply(content="The sum is 5."),
    )

    async def run(question: str) -> str:
        agent = FunctionAgent(tools=[FunctionTool.from_defaults(add)], llm=llm)
        return str(await agent.run(question))

    instrument(db_path, llm=llm)
    first = asyncio.run(run("What is 2 + 3?"))
    uninstrument()
    instrument(db_path, llm=llm, mode="replay")
    assert asyncio.run(run("What is 2 + 3?")) == first
    # The workflow runtime re-raises a step's error as it is: the agent's run raises it.
    with pytest.raises(ReplayMissError) as caught:
        asyncio.run(run("What is 2 + 4?"))
    assert caught.value.kind == "llm" and "2 + 4" in caught.value.differences[0]
    assert openai_server.count() == 2


def test_off_installs_nothing(
    openai_server: OpenAIServer, db_path: str, llm: Any
) -> None:
    inst = instrument(db_path, llm=llm, mode="off")
    assert not is_instrumented() and inst.span_handler is None
    llm.chat([ChatMessage(role="user", content="hi")])
    llm.chat([ChatMessage(role="user", content="hi")])
    assert openai_server.count() == 2
