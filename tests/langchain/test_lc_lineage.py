"""MusubiCallbackHandler + instrument(): nodes, contains/data edges, replays, CLI invalidation."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
import threading
import warnings
from typing import Any

from langchain_core.caches import InMemoryCache
from langchain_core.callbacks import BaseCallbackHandler, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.globals import get_llm_cache, set_llm_cache
from langchain_core.language_models import FakeListChatModel
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableLambda, RunnablePassthrough
from langchain_core.tracers import context as tracer_context
from langchain_openai import ChatOpenAI
from test_lc_cache import _agent_rule, get_weather

import musubi_langchain
from musubi_langchain import MusubiCache, MusubiCallbackHandler, instrument, uninstrument
from tests.support.openai_server import OpenAIServer


class Docs(BaseRetriever):
    """A tiny in-memory retriever: documents whose text shares a word with the query."""

    docs: list[str]

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        words = set(query.lower().split())
        return [Document(page_content=d) for d in self.docs if words & set(d.lower().split())]


def _rag(model: Any) -> Any:
    retriever = Docs(docs=["musubi stores lineage in sqlite", "bananas are yellow", "musubi replays steps"])
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Answer from context:\n{context}"), ("human", "{question}")]
    )

    def format_docs(docs: list[Document]) -> str:
        return "\n".join(d.page_content for d in docs)

    return (
        {"context": retriever | RunnableLambda(format_docs), "question": RunnablePassthrough()}
        | prompt
        | model
        | StrOutputParser()
    )


def _nodes(db: str) -> dict[str, dict[str, Any]]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    rows = {r["node_id"]: dict(r) for r in con.execute("SELECT * FROM musubi_nodes")}
    con.close()
    return rows


def _edges(db: str, kind: str) -> set[tuple[str, str]]:
    con = sqlite3.connect(db)
    rows = set(con.execute("SELECT parent, child FROM musubi_edges WHERE kind = ?", (kind,)).fetchall())
    con.close()
    return rows


def _by_label(nodes: dict[str, dict[str, Any]], kind: str, label: str | None = None) -> str:
    found = [n for n, r in nodes.items() if r["kind"] == kind and (label is None or r["label"] == label)]
    assert len(found) == 1, (kind, label, [(r["kind"], r["label"]) for r in nodes.values()])
    return found[0]


def _reaches(edges: set[tuple[str, str]], a: str, b: str) -> bool:
    frontier, seen = [a], {a}
    while frontier:
        cur = frontier.pop()
        for p, c in edges:
            if p == cur and c not in seen:
                if c == b:
                    return True
                seen.add(c)
                frontier.append(c)
    return False


def test_rag_chain_lineage_has_data_edges(db: str, chat: ChatOpenAI, openai_server: OpenAIServer) -> None:
    instrument(db)
    chain = _rag(chat)
    answer = chain.invoke("what does musubi store")
    assert answer.startswith("answer-")
    uninstrument()  # flushes
    nodes = _nodes(db)
    data = _edges(db, "data")
    retriever = _by_label(nodes, "retriever", "Docs")
    fmt = _by_label(nodes, "chain", "format_docs")
    prompt = _by_label(nodes, "chain", "ChatPromptTemplate")
    model = _by_label(nodes, "chat_model")
    parser = _by_label(nodes, "chain", "StrOutputParser")
    assert (retriever, fmt) in data
    assert (fmt, prompt) in data
    assert (prompt, model) in data
    assert (model, parser) in data
    # The question reaches the retriever and the prompt straight from the input: the
    # passthrough branch is not mistaken for the retriever's upstream.
    passthrough = _by_label(nodes, "chain", "RunnablePassthrough")
    assert (passthrough, retriever) not in data
    # contains edges follow the run tree: the root sequence contains the model call.
    contains = _edges(db, "contains")
    root = _by_label(nodes, "chain", "RunnableSequence")
    assert _reaches(contains, root, model)
    assert nodes[model]["tokens_in"] and nodes[model]["tokens_out"]

    # musubi lineage (the CLI) shows retriever -> ... -> parser.
    out = subprocess.run(
        [sys.executable, "-m", "musubi_core.cli", "--db", db, "--json", "lineage", parser],
        capture_output=True, text=True, check=True,
    )
    graph = json.loads(out.stdout)
    text = json.dumps(graph)
    assert retriever in text and model in text


def test_hit_is_a_replay_of_the_same_node(db: str, chat: ChatOpenAI, openai_server: OpenAIServer) -> None:
    instrument(db)
    chain = _rag(chat)
    first = chain.invoke("what does musubi store")
    second = chain.invoke("what does musubi store")
    assert first == second
    assert openai_server.chat_count == 1
    uninstrument()
    nodes = _nodes(db)
    models = [r for r in nodes.values() if r["kind"] == "chat_model"]
    assert len(models) == 1  # the handler's node IS the cache's node
    assert models[0]["replay_count"] == 1
    assert models[0]["exec_count"] == 1
    out = subprocess.run(
        [sys.executable, "-m", "musubi_core.cli", "--db", db, "--json", "stats"],
        capture_output=True, text=True, check=True,
    )
    stats = json.loads(out.stdout)
    assert stats["by_kind"]["chat_model"]["replays"] == 1
    assert stats["by_kind"]["chat_model"]["tokens_saved"] == models[0]["tokens_in"] + models[0]["tokens_out"]
    assert stats["by_kind"]["chat_model"]["seconds_saved"] >= 0


def _agent_chain(model: ChatOpenAI) -> Any:
    """The agent loop as one runnable, so every turn and tool call is in one trace."""

    def loop(question: str) -> str:
        bound = model.bind_tools([get_weather])
        messages: list[Any] = [SystemMessage("Use tools."), HumanMessage(question)]
        for _ in range(4):
            ai = bound.invoke(messages)
            messages.append(ai)
            if not ai.tool_calls:
                return str(ai.content)
            for call in ai.tool_calls:
                messages.append(get_weather.invoke(call))
        raise AssertionError("agent did not finish")

    return RunnableLambda(loop, name="agent")


def test_cli_invalidate_reruns_exactly_the_invalidated_part(
    db: str, chat: ChatOpenAI, openai_server: OpenAIServer
) -> None:
    openai_server.set_chat_rule(_agent_rule)
    instrument(db)
    agent = _agent_chain(chat)
    first = agent.invoke("Weather in Paris?")
    assert openai_server.chat_count == 2
    assert agent.invoke("Weather in Paris?") == first
    assert openai_server.chat_count == 2
    musubi_langchain.instrument(db)  # idempotent: same instrumentation, nothing reinstalled
    uninstrument()

    nodes = _nodes(db)
    turns = sorted(
        (n for n, r in nodes.items() if r["kind"] == "chat_model"), key=lambda n: nodes[n]["created_at"]
    )
    assert len(turns) == 2
    tool_node = _by_label(nodes, "tool", "get_weather")
    data = _edges(db, "data")
    assert (turns[0], tool_node) in data and (tool_node, turns[1]) in data

    # Invalidate the final turn only: the next run sends exactly that one request.
    subprocess.run(
        [sys.executable, "-m", "musubi_core.cli", "--db", db, "invalidate", turns[1]],
        capture_output=True, text=True, check=True,
    )
    instrument(db)
    assert agent.invoke("Weather in Paris?") == first
    assert openai_server.chat_count == 3
    assert agent.invoke("Weather in Paris?") == first
    assert openai_server.chat_count == 3
    uninstrument()

    # Invalidate the first turn: it and its data descendants (tool, final turn) are stale. The
    # re-requested first turn carries a new random tool-call id, so its output differs and the
    # final turn is re-requested too: exactly the two requests of the invalidated part.
    subprocess.run(
        [sys.executable, "-m", "musubi_core.cli", "--db", db, "invalidate", turns[0]],
        capture_output=True, text=True, check=True,
    )
    instrument(db)
    assert agent.invoke("Weather in Paris?") == first
    requests = openai_server.requests[3:]
    assert len(requests) == 2
    assert not any(m.get("role") == "tool" for m in requests[0].body["messages"])
    assert any(m.get("role") == "tool" for m in requests[1].body["messages"])
    assert agent.invoke("Weather in Paris?") == first
    assert openai_server.chat_count == 5


def test_handler_without_cache_records_nodes(db: str) -> None:
    handler = MusubiCallbackHandler(db)
    model = FakeListChatModel(responses=["hello"])
    chain = ChatPromptTemplate.from_template("say {x}") | model | StrOutputParser()
    assert chain.invoke({"x": "hi"}, config={"callbacks": [handler]}) == "hello"
    handler.flush()
    nodes = _nodes(db)
    kinds = sorted(r["kind"] for r in nodes.values())
    assert kinds.count("chain") == 3 and kinds.count("chat_model") == 1
    model_node = _by_label(nodes, "chat_model")
    prompt = _by_label(nodes, "chain", "ChatPromptTemplate")
    assert (prompt, model_node) in _edges(db, "data")


def test_errors_are_recorded(db: str) -> None:
    instrument(db)

    def boom(x: str) -> str:
        raise ValueError("kaboom")

    chain = RunnableLambda(boom, name="boom")
    with contextlib.suppress(ValueError):
        chain.invoke("x")
    uninstrument()
    failed = [r for r in _nodes(db).values() if r["status"] == "failed"]
    assert failed and "kaboom" in failed[0]["error"]


def test_instrument_is_idempotent_and_reversible(db: str) -> None:
    before_cache = InMemoryCache()
    set_llm_cache(before_cache)
    hooks_before = list(tracer_context._configure_hooks)
    inst = instrument(db)
    assert instrument(db) is inst
    assert isinstance(get_llm_cache(), MusubiCache)
    assert len(tracer_context._configure_hooks) == len(hooks_before) + 1

    seen: list[str] = []

    class Spy(BaseCallbackHandler):
        def on_chain_start(self, serialized: Any, inputs: Any, **kwargs: Any) -> None:
            seen.append("start")

    # Events reach the globally registered handler from another thread, with no config.
    model = FakeListChatModel(responses=["r"])
    t = threading.Thread(target=lambda: (ChatPromptTemplate.from_template("{a}") | model).invoke({"a": "b"}))
    t.start()
    t.join()
    assert inst.handler is not None and len(inst.handler._traces) == 0
    inst.engine.flush()
    assert any(r["kind"] == "chain" for r in _nodes(db).values())

    uninstrument()
    uninstrument()
    assert get_llm_cache() is before_cache
    assert tracer_context._configure_hooks == hooks_before
    count = len(_nodes(db))
    (ChatPromptTemplate.from_template("{a}") | model).invoke({"a": "zzz"})
    assert len(_nodes(db)) == count  # nothing recorded after uninstrument


def test_handler_never_raises_into_langchain(tmp_path: Any) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    handler = MusubiCallbackHandler(str(blocker / "musubi.db"))  # cannot be opened
    chain = ChatPromptTemplate.from_template("{a}") | FakeListChatModel(responses=["ok"]) | StrOutputParser()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert chain.invoke({"a": "b"}, config={"callbacks": [handler]}) == "ok"
        assert chain.invoke({"a": "c"}, config={"callbacks": [handler]}) == "ok"
    ours = [w for w in caught if issubclass(w.category, musubi_langchain.MusubiLangChainWarning)]
    assert len(ours) == 1
    assert len(handler._traces) == 0  # no run left behind after failures
