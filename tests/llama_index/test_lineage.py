"""Spans become calls: every query is a run whose calls form a tree, with flows by content
(embedding -> retrieval -> synthesis -> LLM -> answer), and the instrumented model calls
reach their nodes (the memo)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from llama_index.core import VectorStoreIndex

from musubi_core.store import open_store
from musubi_llama_index import instrument, uninstrument
from tests.support import lineage as lin
from tests.support.openai_server import OpenAIServer

QUESTION = "What does musubi mean?"


# Every test here runs on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_BACKENDS = True


def _record_query(db_path: str, llm: Any, embed_model: Any, documents: list[Any]) -> Any:
    instrument(db_path, llm=llm, embed_model=embed_model)
    index = VectorStoreIndex.from_documents(documents, embed_model=embed_model)
    answer = index.as_query_engine(llm=llm).query(QUESTION)
    uninstrument()  # commits what the recorder holds
    return answer


def _query_run(db_path: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The (one) query run, and its calls by op name (each op must occur once, except the
    nested CompactAndRefine.get_response / TokenTextSplitter.split_text pairs)."""
    (run,) = [
        r for r in lin.runs(db_path, "llama_index") if r["name"] == "RetrieverQueryEngine.query"
    ]
    calls = {c["op_name"]: c for c in lin.calls(db_path, run["run_id"])}
    return run, calls


def test_query_is_a_run_of_calls(
    openai_server: OpenAIServer, db_path: str, llm: Any, embed_model: Any, documents: list[Any]
) -> None:
    _record_query(db_path, llm, embed_model, documents)
    lin.assert_runs_are_trees(db_path)
    run, calls = _query_run(db_path)
    root = calls["RetrieverQueryEngine.query"]
    assert root["parent_call_id"] is None and run["root_call_id"] == root["call_id"]
    assert run["status"] == "done" and run["calls"] == len(lin.calls(db_path, run["run_id"]))

    retrieve = calls["VectorIndexRetriever.retrieve"]
    synth = calls["CompactAndRefine.synthesize"]
    chat = calls["OpenAI.chat"]
    embedding = calls["OpenAIEmbedding.embedding"]
    assert (retrieve["kind"], synth["kind"], chat["kind"], embedding["kind"]) == (
        "retriever",
        "span",
        "llm",
        "embedding",
    )
    # Spans have no node (no identity); model calls reach theirs.
    assert retrieve["node_id"] is None and synth["node_id"] is None
    assert chat["node_id"] and embedding["node_id"]
    assert chat["model"] == "gpt-4o-mini" and chat["tokens_in"] and chat["replayed"] == 0
    # The call tree: the LLM call sits under synthesis, synthesis under the query.
    chain = [c["op_name"] for c in lin.ancestors(db_path, chat["call_id"])]
    assert "CompactAndRefine.synthesize" in chain and chain[-1] == "RetrieverQueryEngine.query"
    assert [c["op_name"] for c in lin.ancestors(db_path, embedding["call_id"])][-2:] == [
        "RetrieverQueryEngine._query",
        "RetrieverQueryEngine.query",
    ]
    # Flows by content: query embedding -> retrieval -> synthesis and the LLM prompt; the
    # LLM answer flows up into the query's result.
    up = lambda call: {c["op_name"] for c in lin.upstream(db_path, call["call_id"])}  # noqa: E731
    assert "OpenAIEmbedding.embedding" in up(retrieve)
    assert "VectorIndexRetriever.retrieve" in up(synth)
    assert {"VectorIndexRetriever.retrieve", "OpenAIEmbedding.embedding"} <= up(chat)
    assert {"OpenAI.chat", "VectorIndexRetriever.retrieve"} <= up(root)
    # The retriever keeps what it returned: the documents the answer used.
    kept = lin.artifact_text(db_path, retrieve["artifact_id"])
    assert any(doc in kept for doc in (d.text for d in documents))
    # Node-level data edges derive from the flows: the query embedding feeds the LLM node.
    assert (embedding["node_id"], chat["node_id"]) in lin.node_edges(db_path)
    # No span is a node: the memo holds the model calls only.
    assert {n["kind"] for n in lin.nodes(db_path).values()} == {"llm", "embedding"}


def test_call_lineage_from_the_store_and_node_lineage_from_the_cli(
    openai_server: OpenAIServer, db_path: str, llm: Any, embed_model: Any, documents: list[Any]
) -> None:
    _record_query(db_path, llm, embed_model, documents)
    _run, calls = _query_run(db_path)
    chat = calls["OpenAI.chat"]
    with open_store(db_path) as store:
        found, flows, cut = store.call_lineage(chat["call_id"])
    assert not cut
    ops = [c.op_name for c in found]
    assert {"OpenAIEmbedding.embedding", "VectorIndexRetriever.retrieve", "OpenAI.chat"} <= set(ops)
    assert ops.index("OpenAIEmbedding.embedding") < ops.index("OpenAI.chat")  # topological
    assert all(f.dst_call_id in {c.call_id for c in found} for f in flows)
    # The LLM node's memo lineage (what invalidation follows) reaches the query embedding.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "musubi_core.cli",
            "--db",
            db_path,
            "lineage",
            chat["node_id"],
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert calls["OpenAIEmbedding.embedding"]["node_id"] in json.dumps(json.loads(proc.stdout))


def test_same_query_again_is_a_new_run_replaying_the_same_node(
    openai_server: OpenAIServer, db_path: str, llm: Any, embed_model: Any, documents: list[Any]
) -> None:
    _record_query(db_path, llm, embed_model, documents)
    nodes_before = set(lin.nodes(db_path))
    openai_server.clear_log()
    _record_query(db_path, llm, embed_model, documents)
    assert openai_server.count() == 0
    assert set(lin.nodes(db_path)) == nodes_before  # the memo: nothing new
    first, second = [
        r for r in lin.runs(db_path, "llama_index") if r["name"] == "RetrieverQueryEngine.query"
    ]
    chat1, chat2 = (
        next(c for c in lin.calls(db_path, r["run_id"]) if c["kind"] == "llm")
        for r in (first, second)
    )
    assert chat1["call_id"] != chat2["call_id"] and chat1["node_id"] == chat2["node_id"]
    assert (chat1["replayed"], chat2["replayed"]) == (0, 1)
    assert chat2["tokens_in"] == chat1["tokens_in"] and chat2["saved_s"] is not None
    assert second["replays"] >= 2 and second["tokens_saved"] > 0  # LLM + query embedding
    lin.assert_runs_are_trees(db_path)


def test_edited_document_each_answer_shows_its_own_documents(
    openai_server: OpenAIServer, db_path: str, llm: Any, embed_model: Any, documents: list[Any]
) -> None:
    """The issue's scenario: one document edited between two runs of a VectorStoreIndex query
    engine. Each answer's call lineage reaches exactly the text it was computed from, inside
    its own run; the unchanged third run replays run 2 with zero requests."""
    from llama_index.core import Document

    old_text = documents[0].text
    new_text = "Musubi now names the cord that binds every cached result to its sources."
    edited = [Document(text=new_text, doc_id="doc-0"), *documents[1:]]
    instrument(db_path, llm=llm, embed_model=embed_model)

    def ask(docs: list[Any]) -> str:
        index = VectorStoreIndex.from_documents(docs, embed_model=embed_model)
        return str(index.as_query_engine(llm=llm, similarity_top_k=len(docs)).query(QUESTION))

    answer1 = ask(documents)
    answer2 = ask(edited)
    openai_server.clear_log()
    answer3 = ask(edited)
    assert openai_server.count() == 0, openai_server.counts()
    assert answer1 != answer2 and answer3 == answer2
    uninstrument()

    lin.assert_runs_are_trees(db_path)
    runs = [
        r for r in lin.runs(db_path, "llama_index") if r["name"] == "RetrieverQueryEngine.query"
    ]
    assert len(runs) == 3
    answers = []
    for run in runs:
        calls = lin.calls(db_path, run["run_id"])
        (chat,) = [c for c in calls if c["kind"] == "llm"]
        (root,) = [c for c in calls if c["parent_call_id"] is None]
        answers.append((run, chat, root))
        for start in (chat, root):
            ups = lin.upstream(db_path, start["call_id"])
            assert ups and {c["run_id"] for c in ups} == {run["run_id"]}, "lineage left its run"
    (run1, chat1, root1), (_run2, chat2, root2), (_run3, chat3, root3) = answers
    for chat, root, seen, unseen in (
        (chat1, root1, old_text, new_text),
        (chat2, root2, new_text, old_text),
        (chat3, root3, new_text, old_text),
    ):
        for start in (chat, root):
            flowed = lin.what_flowed(db_path, start["call_id"])
            assert seen in flowed and unseen not in flowed
    # Run 2 executed a new LLM node (its prompt changed); run 3 replayed it.
    assert chat1["node_id"] != chat2["node_id"] == chat3["node_id"]
    assert (chat1["replayed"], chat2["replayed"], chat3["replayed"]) == (0, 0, 1)
    # The store's own walk (what `musubi lineage CALL` prints) agrees.
    with open_store(db_path) as store:
        found, _flows, _cut = store.call_lineage(chat1["call_id"])
    assert {c.run_id for c in found} == {run1["run_id"]}
    retrieved = [c for c in found if c.kind == "retriever" and c.artifact_id]
    assert retrieved and old_text in lin.artifact_text(db_path, retrieved[0].artifact_id)


def _echo_llm() -> Any:
    """An in-process LLM whose answer carries the question of its prompt: distinct questions
    over the same retrieved context give distinct outputs."""
    from llama_index.core.llms import CompletionResponse, CustomLLM, LLMMetadata
    from llama_index.core.llms.callbacks import llm_completion_callback

    class EchoLLM(CustomLLM):
        model: str = "echo"

        @property
        def metadata(self) -> LLMMetadata:
            return LLMMetadata(model_name=self.model)

        @llm_completion_callback()
        def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
            question = prompt.rsplit("Query:", 1)[-1].split("Answer:", 1)[0].strip()
            return CompletionResponse(text=f"the answer to {question!r}")

        @llm_completion_callback()
        def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
            raise NotImplementedError

    return EchoLLM()


def test_runs_over_the_same_context_never_link(
    db_path: str, documents: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (issue 11): a shared ``TokenTextSplitter.split_text`` span node linked the
    lineage of one query to the answers of earlier ones. Spans are calls now: each run has
    its own, nothing on the span path hashes anything, and no lineage leaves its run."""
    from llama_index.core.embeddings import MockEmbedding

    import musubi_core.identity as identity
    from musubi_core import Engine

    # A constant embedding: every question retrieves the same context (the worst case).
    index = VectorStoreIndex.from_documents(documents, embed_model=MockEmbedding(embed_dim=8))
    engine = Engine(open_store(db_path), namespace="t")
    # Models not patched: lineage only, every query runs (as in the span benchmark).
    instrument(engine=engine, lineage=True, use_settings=False)

    def no_hashing(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the span path computed a content identity")

    monkeypatch.setattr(identity, "canonical_bytes", no_hashing)
    qe = index.as_query_engine(llm=_echo_llm())
    n = 4
    for i in range(n):
        qe.query(f"What does musubi mean? (variant {i})")
    monkeypatch.undo()
    uninstrument()
    engine.close()

    assert lin.nodes(db_path) == {}  # spans are never nodes
    lin.assert_runs_are_trees(db_path)
    runs = lin.runs(db_path, "llama_index")
    assert len(runs) == n
    for i, run in enumerate(runs):
        calls = lin.calls(db_path, run["run_id"])
        splitters = [c for c in calls if c["op_name"] == "TokenTextSplitter.split_text"]
        assert splitters  # each run its own
        (answer,) = [c for c in calls if c["op_name"] == "EchoLLM.complete"]
        ups = lin.upstream(db_path, answer["call_id"])
        assert {c["run_id"] for c in ups} == {run["run_id"]}
        assert f"variant {i}" in (answer["output_preview"] or "")
    # Every flow joins two calls of one run.
    run_of = {c["call_id"]: c["run_id"] for c in lin.calls(db_path)}
    assert all(run_of[src] == run_of[dst] for src, dst in lin.flows(db_path))


def test_root_span_inside_a_step_or_trace_joins_that_run(
    openai_server: OpenAIServer, db_path: str, llm: Any, embed_model: Any, documents: list[Any]
) -> None:
    from musubi_core import Engine, step, use_engine
    from musubi_core.record import trace

    engine = Engine(open_store(db_path))
    instrument(engine=engine, llm=llm, embed_model=embed_model)
    index = VectorStoreIndex.from_documents(documents, embed_model=embed_model)
    qe = index.as_query_engine(llm=llm)

    @step(name="ask")
    def ask(question: str) -> str:
        return str(qe.query(question))

    with use_engine(engine):
        ask(QUESTION)
        with trace("two questions"):
            qe.query(QUESTION)
            qe.query("Where is the lineage kept?")
    uninstrument()
    engine.close()

    lin.assert_runs_are_trees(db_path)
    (step_run,) = lin.runs(db_path, "step")
    step_calls = lin.calls(db_path, step_run["run_id"])
    (step_call,) = [c for c in step_calls if c["kind"] == "step"]
    (query_root,) = [c for c in step_calls if c["op_name"] == "RetrieverQueryEngine.query"]
    assert query_root["parent_call_id"] == step_call["call_id"]
    assert any(c["kind"] == "llm" for c in step_calls)
    (script,) = lin.runs(db_path, "script")
    roots = [
        c
        for c in lin.calls(db_path, script["run_id"])
        if c["op_name"] == "RetrieverQueryEngine.query"
    ]
    assert len(roots) == 2 and all(c["parent_call_id"] is None for c in roots)
    assert not [
        r for r in lin.runs(db_path, "llama_index") if r["name"] == "RetrieverQueryEngine.query"
    ]


def test_query_in_a_durable_step_joins_the_durable_run(
    openai_server: OpenAIServer, tmp_path: Any, llm: Any, embed_model: Any, documents: list[Any]
) -> None:
    from musubi_core import run as durable_run

    db = str(tmp_path / "durable.db")
    instrument(db, llm=llm, embed_model=embed_model)
    qe = VectorStoreIndex.from_documents(documents, embed_model=embed_model).as_query_engine(
        llm=llm
    )

    def workflow(ctx: Any) -> str:
        return ctx.step("ask", lambda: str(qe.query(QUESTION)))

    durable_run(db, workflow)
    uninstrument()
    lin.assert_runs_are_trees(db)
    (run,) = lin.runs(db, "durable")
    calls = lin.calls(db, run["run_id"])
    (ask,) = [c for c in calls if c["op_name"] == "ask"]
    (root,) = [c for c in calls if c["op_name"] == "RetrieverQueryEngine.query"]
    assert root["parent_call_id"] == ask["call_id"]
    assert any(c["kind"] == "llm" and c["node_id"] for c in calls)


def test_workflow_run_is_a_run_of_its_steps(
    openai_server: OpenAIServer, db_path: str, llm: Any
) -> None:
    import asyncio

    from llama_index.core.workflow import Event, StartEvent, StopEvent, Workflow, step

    class Drafted(Event):
        draft: str

    class Writer(Workflow):
        @step
        async def draft(self, ev: StartEvent) -> Drafted:
            resp = await llm.acomplete(f"Draft a line about {ev.topic}")
            return Drafted(draft=resp.text)

        @step
        async def polish(self, ev: Drafted) -> StopEvent:
            resp = await llm.acomplete(f"Polish: {ev.draft}")
            return StopEvent(result=resp.text)

    instrument(db_path, llm=llm)

    async def run() -> str:
        return str(await Writer(timeout=30).run(topic="knots"))

    first = asyncio.run(run())
    assert openai_server.count("chat") == 2
    openai_server.clear_log()
    assert asyncio.run(run()) == first
    assert openai_server.count() == 0
    uninstrument()

    lin.assert_runs_are_trees(db_path)
    runs = lin.runs(db_path, "workflow")
    assert [r["name"] for r in runs] == ["Writer.run", "Writer.run"]
    for run, replayed in zip(runs, (0, 1), strict=True):
        calls = {c["call_id"]: c for c in lin.calls(db_path, run["run_id"])}
        steps = {c["op_name"]: c for c in calls.values() if c["kind"] == "workflow_step"}
        assert set(steps) == {"Writer.draft", "Writer.polish"}
        llm_calls = [c for c in calls.values() if c["kind"] == "llm"]
        assert len(llm_calls) == 2 and {c["replayed"] for c in llm_calls} == {replayed}
        assert {calls[c["parent_call_id"]]["op_name"] for c in llm_calls} == set(steps)
        # The draft flowed into the polishing step (by content: the Drafted event).
        polish_up = {c["op_name"] for c in lin.upstream(db_path, steps["Writer.polish"]["call_id"])}
        assert "Writer.draft" in polish_up


def test_failed_query_is_a_failed_run(
    openai_server: OpenAIServer, db_path: str, llm: Any, embed_model: Any, documents: list[Any]
) -> None:
    from tests.support.openai_server import ChatReply

    openai_server.enqueue_chat(ChatReply(status=400, error="the model refused"))
    instrument(db_path, llm=llm, embed_model=embed_model)
    index = VectorStoreIndex.from_documents(documents, embed_model=embed_model)
    with pytest.raises(Exception, match="the model refused"):
        index.as_query_engine(llm=llm).query(QUESTION)
    uninstrument()
    lin.assert_runs_are_trees(db_path)
    run, calls = _query_run(db_path)
    assert run["status"] == "failed" and "the model refused" in (run["error"] or "")
    assert calls["RetrieverQueryEngine.query"]["status"] == "failed"
    chat = calls["OpenAI.chat"]
    assert chat["status"] == "failed" and chat["node_id"] is None
    assert "the model refused" in (chat["error"] or "")
    assert calls["VectorIndexRetriever.retrieve"]["status"] == "done"
    # A failed request is not a node: nothing replays it.
    assert "llm" not in {n["kind"] for n in lin.nodes(db_path).values()}


def test_broken_store_never_breaks_llamaindex(
    openai_server: OpenAIServer, tmp_path: Any, llm: Any, embed_model: Any, documents: list[Any]
) -> None:
    bad = tmp_path / "not_a_db"
    bad.mkdir()
    with pytest.warns(RuntimeWarning, match="musubi"):
        instrument(str(bad), llm=llm, embed_model=embed_model)
        index = VectorStoreIndex.from_documents(documents, embed_model=embed_model)
        answer = index.as_query_engine(llm=llm).query(QUESTION)
    assert "answer-" in str(answer)
    assert openai_server.count("chat") == 1
