"""MusubiCallbackHandler + instrument(): runs, calls and flows, replays of the cache's nodes,
node-level data edges derived through node-less calls, CLI invalidation."""

from __future__ import annotations

import contextlib
import json
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
from tests.support import lineage
from tests.support.openai_server import OpenAIServer

# Every test here runs on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_BACKENDS = True


class Docs(BaseRetriever):
    """A tiny in-memory retriever: documents whose text shares a word with the query."""

    docs: list[str]

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        words = set(query.lower().split())
        return [Document(page_content=d) for d in self.docs if words & set(d.lower().split())]


def _rag(model: Any, docs: list[str] | None = None) -> Any:
    if docs is None:
        docs = ["musubi stores lineage in sqlite", "bananas are yellow", "musubi replays steps"]
    retriever = Docs(docs=docs)
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


def _one(rows: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [r for r in rows if r["kind"] == kind and (name is None or r["op_name"] == name)]
    assert len(found) == 1, (kind, name, [(r["kind"], r["op_name"]) for r in rows])
    return found[0]


def test_rag_chain_calls_flows_and_tree(db: str, chat: ChatOpenAI, openai_server: OpenAIServer) -> None:
    instrument(db)
    chain = _rag(chat)
    answer = chain.invoke("what does musubi store")
    assert answer.startswith("answer-")
    uninstrument()  # flushes
    (run,) = lineage.runs(db)
    assert run["kind"] == "langchain" and run["status"] == "done"
    calls = lineage.calls(db, run["run_id"])
    assert run["calls"] == len(calls) and run["root_call_id"] == calls[0]["call_id"]
    lineage.assert_runs_are_trees(db)
    flows = lineage.flows(db)
    retriever = _one(calls, "retriever", "Docs")
    fmt = _one(calls, "chain", "format_docs")
    prompt = _one(calls, "chain", "ChatPromptTemplate")
    model = _one(calls, "chat_model")
    parser = _one(calls, "chain", "StrOutputParser")
    assert (retriever["call_id"], fmt["call_id"]) in flows
    assert (fmt["call_id"], prompt["call_id"]) in flows
    assert (prompt["call_id"], model["call_id"]) in flows
    assert (model["call_id"], parser["call_id"]) in flows
    # The question reaches the retriever and the prompt straight from the input: the
    # passthrough branch is not mistaken for the retriever's upstream.
    passthrough = _one(calls, "chain", "RunnablePassthrough")
    assert (passthrough["call_id"], retriever["call_id"]) not in flows
    # Distinct runnables are distinct calls: the root sequence, the parallel map and the inner
    # `retriever | format_docs` sequence are three calls, each under the one that ran it.
    sequences = [c for c in calls if c["op_name"] == "RunnableSequence"]
    assert len(sequences) == 2 and sequences[0]["parent_call_id"] is None
    root = sequences[0]
    assert [a["call_id"] for a in lineage.ancestors(db, model["call_id"])] == [root["call_id"]]
    inner = sequences[1]
    assert lineage.ancestors(db, retriever["call_id"])[0]["call_id"] == inner["call_id"]
    # The model call reached the cache's node; its tokens are on the call.
    assert model["node_id"] and model["replayed"] == 0
    assert model["tokens_in"] and model["tokens_out"] and model["model"] == "gpt-4o-mini"
    assert "musubi stores lineage in sqlite" in lineage.artifact_text(db, retriever["artifact_id"])
    # What flowed into the answer: the retrieved document, through format_docs and the prompt.
    assert "musubi stores lineage in sqlite" in lineage.what_flowed(db, parser["call_id"])
    assert "bananas" not in lineage.what_flowed(db, parser["call_id"])


def test_edited_document_old_answer_points_at_old_text(
    db: str, chat: ChatOpenAI, openai_server: OpenAIServer
) -> None:
    """After a document is edited, the old answer's lineage still reaches the OLD text and the
    new answer's the NEW; neither reaches the other run's calls."""
    instrument(db)
    question = "what does musubi store"
    first = _rag(chat, docs=["musubi stores lineage in sqlite"]).invoke(question)
    second = _rag(chat, docs=["musubi stores lineage in postgres now"]).invoke(question)
    assert first != second and openai_server.chat_count == 2
    uninstrument()
    lineage.assert_runs_are_trees(db)
    old_run, new_run = lineage.runs(db)
    old_answer = _one(lineage.calls(db, old_run["run_id"]), "chain", "StrOutputParser")
    new_answer = _one(lineage.calls(db, new_run["run_id"]), "chain", "StrOutputParser")
    old_flow = lineage.what_flowed(db, old_answer["call_id"])
    new_flow = lineage.what_flowed(db, new_answer["call_id"])
    assert "in sqlite" in old_flow and "postgres" not in old_flow
    assert "postgres now" in new_flow and "in sqlite" not in new_flow
    for answer, run in ((old_answer, old_run), (new_answer, new_run)):
        assert {c["run_id"] for c in lineage.upstream(db, answer["call_id"])} == {run["run_id"]}


def test_hit_is_a_replay_of_the_same_node(db: str, chat: ChatOpenAI, openai_server: OpenAIServer) -> None:
    instrument(db)
    chain = _rag(chat)
    first = chain.invoke("what does musubi store")
    second = chain.invoke("what does musubi store")
    assert first == second
    assert openai_server.chat_count == 1
    uninstrument()
    nodes = lineage.nodes(db)
    models = [r for r in nodes.values() if r["kind"] == "chat_model"]
    assert len(models) == 1  # the handler's model calls reach the cache's node
    assert models[0]["replay_count"] == 1 and models[0]["exec_count"] == 1
    run1, run2 = lineage.runs(db)
    call1 = _one(lineage.calls(db, run1["run_id"]), "chat_model")
    call2 = _one(lineage.calls(db, run2["run_id"]), "chat_model")
    assert call1["node_id"] == call2["node_id"] == models[0]["node_id"]
    assert (call1["replayed"], call2["replayed"]) == (0, 1)
    assert call2["tokens_in"] == models[0]["tokens_in"] and call2["saved_s"] is not None
    assert run2["replays"] == 1 and run2["tokens_saved"] == models[0]["tokens_in"] + models[0]["tokens_out"]
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

    nodes = lineage.nodes(db)
    turns = sorted(
        (n for n, r in nodes.items() if r["kind"] == "chat_model"), key=lambda n: nodes[n]["created_at"]
    )
    assert len(turns) == 2
    # The tool call sits between the turns: its output flowed into turn 2, so turn 1's node has
    # a data edge to turn 2's node (derived through the tool call, which has no node).
    assert (turns[0], turns[1]) in lineage.node_edges(db)
    run1 = lineage.runs(db)[0]
    calls = lineage.calls(db, run1["run_id"])
    tool = _one(calls, "tool", "get_weather")
    models = [c for c in calls if c["kind"] == "chat_model"]
    flows = lineage.flows(db)
    assert (models[0]["call_id"], tool["call_id"]) in flows and (tool["call_id"], models[1]["call_id"]) in flows
    assert "Paris" in lineage.artifact_text(db, tool["artifact_id"])

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


def test_handler_without_cache_records_calls(db: str) -> None:
    handler = MusubiCallbackHandler(db)
    model = FakeListChatModel(responses=["hello"])
    chain = ChatPromptTemplate.from_template("say {x}") | model | StrOutputParser()
    assert chain.invoke({"x": "hi"}, config={"callbacks": [handler]}) == "hello"
    handler.flush()
    calls = lineage.calls(db)
    kinds = sorted(c["kind"] for c in calls)
    assert kinds == ["chain", "chain", "chain", "chat_model"]
    model_call = _one(calls, "chat_model")
    prompt = _one(calls, "chain", "ChatPromptTemplate")
    assert (prompt["call_id"], model_call["call_id"]) in lineage.flows(db)
    # No cache, nothing to replay: the model call reaches no node, and nothing is a node.
    assert model_call["node_id"] is None and model_call["output_preview"] == "hello"
    assert lineage.nodes(db) == {}


def test_errors_are_recorded(db: str) -> None:
    instrument(db)

    def boom(x: str) -> str:
        raise ValueError("kaboom")

    chain = RunnableLambda(boom, name="boom")
    with contextlib.suppress(ValueError):
        chain.invoke("x")
    uninstrument()
    (failed,) = [c for c in lineage.calls(db) if c["status"] == "failed"]
    assert "kaboom" in failed["error"] and failed["op_name"] == "boom"
    (run,) = lineage.runs(db)
    assert run["status"] == "failed" and "kaboom" in run["error"]


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
    assert inst.handler is not None and len(inst.handler._runs) == 0
    inst.engine.flush()
    assert any(c["kind"] == "chain" for c in lineage.calls(db))

    uninstrument()
    uninstrument()
    assert get_llm_cache() is before_cache
    assert tracer_context._configure_hooks == hooks_before
    count = len(lineage.calls(db))
    (ChatPromptTemplate.from_template("{a}") | model).invoke({"a": "zzz"})
    assert len(lineage.calls(db)) == count  # nothing recorded after uninstrument


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
    assert len(handler._runs) == 0  # no run left behind after failures


def test_cache_without_a_handler_records_its_lookups_in_one_run(db: str) -> None:
    """Lookups no handler sees are calls too: one run per burst of calls outside any trace
    (not one run per call), with the hits as replays of the cache's node."""
    cache = MusubiCache(db)
    model = FakeListChatModel(responses=["one", "two"], cache=cache)
    for _ in range(5):
        assert model.invoke("same question").content == "one"
    cache.engine.flush()
    (run,) = lineage.runs(db)
    assert run["kind"] == "langchain" and (run["calls"], run["replays"]) == (5, 4)
    calls = lineage.calls(db, run["run_id"])
    assert [c["replayed"] for c in calls] == [0, 1, 1, 1, 1]
    assert len({c["node_id"] for c in calls}) == 1 and calls[0]["node_id"]


def _eventually(check: Any, deadline_s: float = 60.0) -> Any:
    """Poll ``check`` until it returns something truthy (liveness, not speed: the recorder
    commits in the background)."""
    import time

    end = time.monotonic() + deadline_s
    while True:
        found = check()
        if found or time.monotonic() > end:
            return found
        time.sleep(0.05)


def test_calls_reach_the_store_without_flush(db: str) -> None:
    """One chain, then nothing: its calls and run are committed in the background."""
    handler = MusubiCallbackHandler(db)
    chain = ChatPromptTemplate.from_template("say {x}") | FakeListChatModel(responses=["hi"])
    chain.invoke({"x": "one"}, config={"callbacks": [handler]})
    assert len(_eventually(lambda: lineage.calls(db))) == 3
    (run,) = _eventually(lambda: lineage.runs(db, "langchain"))
    assert run["calls"] == 3 and run["status"] == "done"


def test_a_running_trace_calls_reach_the_store(db: str) -> None:
    """A long trace's finished calls are committed while it still runs."""
    handler = MusubiCallbackHandler(db)

    def wait_for_the_first_step(text: str) -> bool:
        return bool(_eventually(lambda: [c for c in lineage.calls(db) if c["op_name"] == "first"]))

    chain = RunnableLambda(lambda q: q + " musubi", name="first") | RunnableLambda(
        wait_for_the_first_step, name="second"
    )
    assert chain.invoke("what is", config={"callbacks": [handler]}) is True
    handler.flush()
    calls = lineage.calls(db)
    assert sorted(c["op_name"] for c in calls) == ["RunnableSequence", "first", "second"]
    first, second = _one(calls, "chain", "first"), _one(calls, "chain", "second")
    assert (first["call_id"], second["call_id"]) in lineage.flows(db)
    assert second["input_preview"] == "what is musubi" and second["output_preview"] == "True"


def test_many_traces_are_recorded_in_order(db: str) -> None:
    """More traces than one batch of rows: every run and call, numbered in start order, with
    the flows and previews of each."""
    handler = MusubiCallbackHandler(db)
    chain = (
        RunnableLambda(lambda q: {"question": q.strip()})
        | ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{question}")])
        | FakeListChatModel(responses=["an answer that is long enough"])
        | StrOutputParser()
        | RunnableLambda(lambda s: s.upper())
    )
    n = 150
    for i in range(n):
        assert chain.invoke(f" question {i} ", config={"callbacks": [handler]}) == (
            "AN ANSWER THAT IS LONG ENOUGH"
        )
    handler.flush()
    runs = lineage.runs(db, "langchain")
    assert len(runs) == n and all(r["calls"] == 6 and r["status"] == "done" for r in runs)
    lineage.assert_runs_are_trees(db)
    flows = lineage.flows(db)
    for run in runs:
        calls = sorted(lineage.calls(db, run["run_id"]), key=lambda c: c["seq"])
        assert [c["seq"] for c in calls] == list(range(6))
        root, first, prompt, model, parser, last = calls
        assert root["call_id"] == run["root_call_id"] and root["parent_call_id"] is None
        assert root["input_preview"].startswith(" question ")
        assert prompt["input_preview"] == f"{{question: '{first['input_preview'].strip()}'}}"
        assert model["input_preview"].startswith("['Be brief.', 'question ")
        assert last["output_preview"] == root["output_preview"] == "AN ANSWER THAT IS LONG ENOUGH"
        for a, b in ((first, prompt), (prompt, model), (model, parser), (parser, last)):
            assert (a["call_id"], b["call_id"]) in flows
