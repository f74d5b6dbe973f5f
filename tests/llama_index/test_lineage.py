"""Spans become nodes; lineage of a query shows embedding -> retrieval -> synthesis -> LLM."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections import defaultdict
from typing import Any

import pytest
from llama_index.core import VectorStoreIndex

from musubi_llama_index import instrument, uninstrument
from tests.support.openai_server import OpenAIServer


def _graph(db_path: str) -> tuple[dict[str, tuple[str, str]], list[tuple[str, str, str]]]:
    with sqlite3.connect(db_path) as c:
        nodes = {
            nid: (kind, label or "")
            for nid, kind, label in c.execute("SELECT node_id, kind, label FROM musubi_nodes")
        }
        edges = list(c.execute("SELECT parent, child, kind FROM musubi_edges"))
    return nodes, edges


def _reachable(edges: list[tuple[str, str, str]], start: set[str], kinds: set[str]) -> set[str]:
    out: dict[str, set[str]] = defaultdict(set)
    for p, ch, k in edges:
        if k in kinds:
            out[p].add(ch)
    seen, stack = set(start), list(start)
    while stack:
        for nxt in out[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _record_query(db_path: str, llm: Any, embed_model: Any, documents: list[Any]) -> None:
    instrument(db_path, llm=llm, embed_model=embed_model)
    index = VectorStoreIndex.from_documents(documents, embed_model=embed_model)
    index.as_query_engine(llm=llm).query("What does musubi mean?")
    uninstrument()  # flushes buffered span nodes


def test_query_lineage_chain(
    openai_server: OpenAIServer, db_path: str, llm: Any, embed_model: Any, documents: list[Any]
) -> None:
    _record_query(db_path, llm, embed_model, documents)
    nodes, edges = _graph(db_path)

    def ids(pred: Any) -> set[str]:
        return {n for n, (kind, label) in nodes.items() if pred(kind, label)}

    query_embeddings = ids(lambda k, lab: k == "embedding")
    retrievals = ids(lambda k, lab: lab == "VectorIndexRetriever.retrieve")
    synth = ids(lambda k, lab: lab == "CompactAndRefine.synthesize")
    llms = ids(lambda k, lab: k == "llm")
    roots = ids(lambda k, lab: lab == "RetrieverQueryEngine.query")
    assert len(retrievals) == len(synth) == len(llms) == len(roots) == 1

    # data: embedding -> retrieval -> synthesis; synthesis contains the LLM call, and the
    # LLM call depends (by content: retrieved text in its prompt) on the retrieval.
    data_from_embeddings = _reachable(edges, query_embeddings, {"data"})
    assert retrievals <= data_from_embeddings
    assert synth <= _reachable(edges, retrievals, {"data"})
    assert llms <= _reachable(edges, synth, {"contains"})
    assert llms <= _reachable(edges, retrievals, {"data"})
    # the LLM answer flows back up into the query result
    assert roots <= _reachable(edges, llms, {"data"})
    # and the query contains everything
    assert retrievals | synth | llms <= _reachable(edges, roots, {"contains"})


def test_musubi_lineage_command_shows_chain(
    openai_server: OpenAIServer, db_path: str, llm: Any, embed_model: Any, documents: list[Any]
) -> None:
    _record_query(db_path, llm, embed_model, documents)
    nodes, _ = _graph(db_path)
    (llm_node,) = [n for n, (kind, _) in nodes.items() if kind == "llm"]
    proc = subprocess.run(
        [sys.executable, "-m", "musubi_core.cli", "--db", db_path, "lineage", llm_node,
         "--format", "json"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    text = json.dumps(data)
    for label in ("OpenAIEmbedding.embedding", "VectorIndexRetriever.retrieve",
                  "CompactAndRefine.synthesize", "OpenAI.chat"):
        assert label in text, label


def test_replayed_query_reuses_the_same_nodes(
    openai_server: OpenAIServer, db_path: str, llm: Any, embed_model: Any, documents: list[Any]
) -> None:
    _record_query(db_path, llm, embed_model, documents)
    before, _ = _graph(db_path)
    _record_query(db_path, llm, embed_model, documents)
    after, _ = _graph(db_path)
    assert set(after) == set(before)  # deterministic span identity: no new nodes


def test_workflow_steps_are_nodes_of_their_run(
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

    with sqlite3.connect(db_path) as c:
        steps = c.execute(
            "SELECT label, run_id FROM musubi_nodes WHERE kind = 'workflow_step'"
        ).fetchall()
    labels = {label for label, _ in steps}
    assert {"Writer.draft", "Writer.polish"} <= labels
    assert all(run_id for _, run_id in steps)
    nodes, edges = _graph(db_path)
    step_ids = {n for n, (_, lab) in nodes.items() if lab in ("Writer.draft", "Writer.polish")}
    llm_ids = {n for n, (k, _) in nodes.items() if k == "llm"}
    assert llm_ids <= _reachable(edges, step_ids, {"contains"})


def test_broken_store_never_breaks_llamaindex(
    openai_server: OpenAIServer, tmp_path: Any, llm: Any, embed_model: Any, documents: list[Any]
) -> None:
    bad = tmp_path / "not_a_db"
    bad.mkdir()
    with pytest.warns(RuntimeWarning, match="musubi"):
        instrument(str(bad), llm=llm, embed_model=embed_model)
        index = VectorStoreIndex.from_documents(documents, embed_model=embed_model)
        answer = index.as_query_engine(llm=llm).query("What does musubi mean?")
    assert "answer-" in str(answer)
    assert openai_server.count("chat") == 1


@pytest.mark.parametrize(
    "component",
    [
        None,
        {"class": "x.Y", "params": {"top_k": 2, "mode": "compact"}},
        # Equal under ==, different canonical encodings: the memo must keep them apart.
        {"class": "x.Y", "params": {"v": 1}},
        {"class": "x.Y", "params": {"v": 1.0}},
        {"class": "x.Y", "params": {"v": True}},
        {"class": "x.Y", "params": {"v": [1, "a", None, 0.5]}},
    ],
)
def test_span_key_memo_matches_engine_key(tmp_path: Any, component: Any) -> None:
    from musubi_core import Engine, SQLiteStore
    from musubi_llama_index._lineage import span_key

    with Engine(SQLiteStore(str(tmp_path / "k.db"))) as engine:
        inputs = {"query": "What is musubi?", "n": 3}
        for _ in range(2):  # a miss, then a memo hit
            got = span_key("llama_index:X.query", inputs, component)
            want = engine.key("llama_index:X.query", inputs, fingerprint={"component": component})
            assert got == want
    ids = {span_key("op", {}, {"params": {"v": v}}).node_id for v in (1, 1.0, True)}
    assert len(ids) == 3


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


def test_distinct_queries_never_share_a_span_node(db_path: str, documents: list[Any]) -> None:
    """Regression: ``DefaultRefineProgram.__call__`` is called with the context only (the
    question is partially formatted into the prompt the program holds), so its identity
    missed the question: distinct queries over the same context collided on one node, which
    was re-written with each new answer (its data-descendants marked stale)."""
    from llama_index.core.embeddings import MockEmbedding

    from musubi_core import Engine, SQLiteStore

    # A constant embedding: every question retrieves the same context (the worst case).
    index = VectorStoreIndex.from_documents(documents, embed_model=MockEmbedding(embed_dim=8))
    engine = Engine(SQLiteStore(db_path), namespace="t")
    # Models not patched: lineage only, every query runs (as in the span benchmark).
    instrument(engine=engine, lineage=True, use_settings=False)
    qe = index.as_query_engine(llm=_echo_llm())
    n = 6
    for i in range(n):
        qe.query(f"What does musubi mean? (variant {i})")
        engine.flush()  # one write batch per query: a collision is a re-write, not a merge

    def rows() -> list[tuple[str, str, int, str]]:
        with sqlite3.connect(db_path) as c:
            return list(c.execute("SELECT node_id, op_name, exec_count, status FROM musubi_nodes"))

    first = rows()
    # A text splitter sees the same context text under the same settings: a legitimate
    # re-execution with the same output. Every other span ran once per distinct query.
    repeating = {"llama_index:TokenTextSplitter.split_text"}
    rewritten = [(op, cnt) for _, op, cnt, _ in first if cnt != 1 and op not in repeating]
    assert rewritten == []
    assert [op for _, op, _, status in first if status != "done"] == []
    per_op: dict[str, int] = defaultdict(int)
    for _, op, _, _ in first:
        per_op[op] += 1
    assert per_op["llama_index:DefaultRefineProgram.__call__"] == n
    assert per_op["llama_index:RetrieverQueryEngine.query"] == n

    # The same query again maps onto the same nodes: nothing added, nothing stale.
    qe.query("What does musubi mean? (variant 2)")
    engine.flush()
    again = rows()
    uninstrument()
    engine.close()
    assert {r[0] for r in again} == {r[0] for r in first}
    assert [op for _, op, _, status in again if status != "done"] == []
