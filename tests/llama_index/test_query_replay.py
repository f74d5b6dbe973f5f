"""Same query twice -> zero provider requests the second time (sync, async, streaming)."""

from __future__ import annotations

import asyncio
from typing import Any

from llama_index.core import VectorStoreIndex
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.llms.openai import OpenAI

from musubi_llama_index import instrument
from tests.support import lineage as lin
from tests.support.openai_server import OpenAIServer
from tests.support.storedb import REPLAYS

QUESTION = "What does musubi mean?"


# Every test here runs on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_BACKENDS = True


def _build(documents: list[Any], embed_model: Any) -> VectorStoreIndex:
    return VectorStoreIndex.from_documents(documents, embed_model=embed_model)


def test_sync_query_replays_with_zero_requests(
    openai_server: OpenAIServer, db_path: str, llm: Any, embed_model: Any, documents: list[Any]
) -> None:
    inst = instrument(db_path, llm=llm, embed_model=embed_model)
    first = _build(documents, embed_model).as_query_engine(llm=llm).query(QUESTION)
    assert openai_server.count("chat") == 1
    assert openai_server.count("embeddings") >= 2  # documents + query
    assert "answer-" in str(first)

    openai_server.clear_log()
    second = _build(documents, embed_model).as_query_engine(llm=llm).query(QUESTION)
    assert openai_server.count() == 0, openai_server.counts()
    assert str(second) == str(first)
    assert [n.node.get_content() for n in second.source_nodes] == [
        n.node.get_content() for n in first.source_nodes
    ]
    inst.flush()
    llm_rows = [
        (r["exec_count"], r["replay_count"], r["tokens_in"])
        for r in lin._rows(
            db_path, f"SELECT exec_count, {REPLAYS} AS replay_count, tokens_in FROM musubi_nodes WHERE kind = 'llm'"
        )
    ]
    assert len(llm_rows) == 1
    exec_count, replay_count, tokens_in = llm_rows[0]
    assert (exec_count, replay_count) == (1, 1)
    assert tokens_in and tokens_in > 0


def test_changed_question_misses(
    openai_server: OpenAIServer, db_path: str, llm: Any, embed_model: Any, documents: list[Any]
) -> None:
    instrument(db_path, llm=llm, embed_model=embed_model)
    engine = _build(documents, embed_model).as_query_engine(llm=llm)
    engine.query(QUESTION)
    openai_server.clear_log()
    engine.query("Where is the lineage kept?")
    assert openai_server.count("chat") == 1
    assert openai_server.count("embeddings") == 1  # only the new query text


def test_async_query_replays_with_zero_requests(
    openai_server: OpenAIServer, db_path: str, llm: Any, embed_model: Any, documents: list[Any]
) -> None:
    instrument(db_path, llm=llm, embed_model=embed_model)

    async def run() -> str:
        index = _build(documents, embed_model)
        return str(await index.as_query_engine(llm=llm).aquery(QUESTION))

    first = asyncio.run(run())
    assert openai_server.count("chat") == 1
    openai_server.clear_log()
    second = asyncio.run(run())
    assert openai_server.count() == 0, openai_server.counts()
    assert second == first


def test_async_gather_queries_replay(
    openai_server: OpenAIServer, db_path: str, llm: Any, embed_model: Any, documents: list[Any]
) -> None:
    instrument(db_path, llm=llm, embed_model=embed_model)
    index = _build(documents, embed_model)
    questions = [QUESTION, "What is SQLite used for?", "What do embeddings do?"]

    async def run() -> list[str]:
        qe = index.as_query_engine(llm=llm)
        return [str(r) for r in await asyncio.gather(*(qe.aquery(q) for q in questions))]

    first = asyncio.run(run())
    assert openai_server.count("chat") == 3
    openai_server.clear_log()
    assert asyncio.run(run()) == first
    assert openai_server.count() == 0
    # Concurrent queries are runs of their own, each one tree with its own LLM call.
    from musubi_llama_index import uninstrument
    from tests.support import lineage as lin

    uninstrument()
    lin.assert_runs_are_trees(db_path)
    runs = [r for r in lin.runs(db_path, "llama_index") if r["name"] == "RetrieverQueryEngine.aquery"]
    assert len(runs) == 6
    for run in runs:
        calls = lin.calls(db_path, run["run_id"])
        assert len([c for c in calls if c["kind"] == "llm"]) == 1
        assert len([c for c in calls if c["parent_call_id"] is None]) == 1


def test_streaming_query_replays_as_generator(
    openai_server: OpenAIServer, db_path: str, llm: Any, embed_model: Any, documents: list[Any]
) -> None:
    instrument(db_path, llm=llm, embed_model=embed_model)
    index = _build(documents, embed_model)
    first = index.as_query_engine(llm=llm, streaming=True).query(QUESTION)
    chunks1 = list(first.response_gen)
    assert openai_server.count("chat") == 1
    assert len(chunks1) > 1  # the server streams word by word

    openai_server.clear_log()
    second = _build(documents, embed_model).as_query_engine(llm=llm, streaming=True).query(
        QUESTION
    )
    chunks2 = list(second.response_gen)
    assert openai_server.count() == 0, openai_server.counts()
    assert chunks2 == chunks1
    # The streamed LLM request is a call of its node both times (recorded when the stream
    # ended, after the query's spans exited), executed and then replayed.
    from musubi_llama_index import uninstrument
    from tests.support import lineage as lin

    uninstrument()
    llm_calls = [c for c in lin.calls(db_path) if c["kind"] == "llm" and c["node_id"]]
    assert [c["replayed"] for c in llm_calls] == [0, 1]
    assert llm_calls[0]["node_id"] == llm_calls[1]["node_id"]
    assert all(c["status"] == "done" and c["output_preview"] for c in llm_calls)
    lin.assert_runs_are_trees(db_path)


def test_async_streaming_replays(
    openai_server: OpenAIServer, db_path: str, llm: Any, embed_model: Any, documents: list[Any]
) -> None:
    instrument(db_path, llm=llm, embed_model=embed_model)
    index = _build(documents, embed_model)

    async def run() -> list[str]:
        resp = await index.as_query_engine(llm=llm, streaming=True).aquery(QUESTION)
        return [d async for d in resp.async_response_gen()]

    first = asyncio.run(run())
    assert openai_server.count("chat") == 1
    openai_server.clear_log()
    second = asyncio.run(run())
    assert openai_server.count() == 0
    assert "".join(second) == "".join(first)


def test_engine_built_before_instrument_replays(
    openai_server: OpenAIServer, db_path: str, llm: Any, embed_model: Any, documents: list[Any]
) -> None:
    engine = _build(documents, embed_model).as_query_engine(llm=llm)  # before instrument()
    openai_server.clear_log()
    instrument(db_path, llm=llm, embed_model=embed_model)
    engine.query(QUESTION)
    assert openai_server.count("chat") == 1
    openai_server.clear_log()
    engine.query(QUESTION)
    assert openai_server.count() == 0


def test_class_kept_for_isinstance(db_path: str, llm: Any, embed_model: Any) -> None:
    instrument(db_path, llm=llm, embed_model=embed_model)
    assert isinstance(llm, OpenAI)
    assert isinstance(llm, FunctionCallingLLM)
    assert type(llm).__name__ == "OpenAI"
    assert llm.class_name() == "openai_llm"


def test_direct_llm_calls_all_forms(
    openai_server: OpenAIServer, db_path: str, llm: Any
) -> None:
    from llama_index.core.llms import ChatMessage

    instrument(db_path, llm=llm)
    msgs = [ChatMessage(role="user", content="hello there musubi")]

    def calls() -> list[str]:
        out = [
            llm.chat(msgs).message.content,
            llm.complete("complete me please").text,
            "".join(r.delta or "" for r in llm.stream_chat(msgs)),
            "".join(r.delta or "" for r in llm.stream_complete("stream complete me")),
        ]

        async def acalls() -> list[str]:
            a = (await llm.achat(msgs)).message.content
            b = (await llm.acomplete("complete me please")).text
            c = "".join([r.delta or "" async for r in await llm.astream_chat(msgs)])
            d = "".join(
                [r.delta or "" async for r in await llm.astream_complete("stream complete me")]
            )
            return [a, b, c, d]

        return out + asyncio.run(acalls())

    first = calls()
    # chat/achat/stream_chat/astream_chat share one node; so do the complete forms with the
    # same prompt; "stream complete me" is a third prompt.
    assert openai_server.count("chat") == 3, openai_server.counts()
    openai_server.clear_log()
    second = calls()
    assert openai_server.count() == 0
    assert second == first


def test_sampling_params_and_secrets_in_identity(
    openai_server: OpenAIServer, db_path: str
) -> None:
    from llama_index.core.llms import ChatMessage

    msgs = [ChatMessage(role="user", content="same prompt")]
    base = {"model": "gpt-4o-mini", "api_base": openai_server.base_url, "max_retries": 0}
    a = OpenAI(**base, api_key="key-one", temperature=0.0)
    instrument(db_path, llm=a)
    a.chat(msgs)
    b = OpenAI(**base, api_key="key-two", temperature=0.0)  # other key: same node
    instrument(llm=b)
    b.chat(msgs)
    assert openai_server.count("chat") == 1
    c = OpenAI(**base, api_key="key-one", temperature=0.7)  # other temperature: new node
    instrument(llm=c)
    c.chat(msgs)
    assert openai_server.count("chat") == 2
    from musubi_llama_index import uninstrument

    uninstrument()  # flushes and closes: everything is on disk now
    raw = lin.raw_bytes(db_path)
    assert b"same prompt" in raw  # the check below can see stored text
    assert b"key-one" not in raw and b"key-two" not in raw
