"""``MusubiNodeCache`` with real ``StateGraph``s: a cached node is skipped by the next process,
an edit to its body recomputes it, TTL and ``clear_cache`` behave, hits are replayed calls of
the graph's run, and a stored value edited in the file is a miss that never reaches pickle."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pickle
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import ormsgpack
import pytest
from langchain_core.messages import AIMessage, HumanMessage
from pydantic import BaseModel
from typing_extensions import TypedDict

pytest.importorskip("langgraph.cache.base")
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.types import CachePolicy

from musubi_core.codec import JSONCodec
from musubi_langchain import MusubiLangChainWarning, instrument, uninstrument
from musubi_langchain._lgvalues import MSGPACK_MARK
from musubi_langchain.langgraph import MusubiNodeCache
from tests.support import lineage, tamper

# Runs on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_BACKENDS = True

GRAPH_APP = '''
import json, os, sys
from typing_extensions import TypedDict
from langgraph.graph import START, StateGraph
from langgraph.types import CachePolicy
from musubi_langchain.langgraph import MusubiNodeCache


class State(TypedDict, total=False):
    text: str
    summary: str


def summarize(state: State) -> State:
    with open(os.environ["NODE_RUNS"], "a") as runs:
        runs.write("summarize\\n")
    return {"summary": state["text"].upper()}


def main(db: str) -> None:
    graph = StateGraph(State)
    graph.add_node("summarize", summarize, cache_policy=CachePolicy())
    graph.add_edge(START, "summarize")
    app = graph.compile(cache=MusubiNodeCache(db))
    updates = list(app.stream({"text": "musubi ties knots"}))
    print(json.dumps(updates[-1]))
'''


def _run_app(folder: Path, db: Path, runs: Path) -> dict[str, Any]:
    env = {**os.environ, "NODE_RUNS": str(runs)}
    proc = subprocess.run(
        [sys.executable, "-c", f"import graph_app; graph_app.main({str(db)!r})"],
        cwd=folder, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "MusubiLangChainWarning" not in proc.stderr
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _executions(runs: Path) -> int:
    return len(runs.read_text().splitlines()) if runs.exists() else 0


def test_a_new_process_skips_the_cached_node_and_an_edit_to_its_body_recomputes_it(
    tmp_path: Path,
) -> None:
    app, db, runs = tmp_path / "graph_app.py", tmp_path / "musubi.db", tmp_path / "runs.txt"
    app.write_text(GRAPH_APP)
    first = _run_app(tmp_path, db, runs)
    assert first == {"summarize": {"summary": "MUSUBI TIES KNOTS"}} and _executions(runs) == 1

    second = _run_app(tmp_path, db, runs)  # another process: served from the file
    assert second == {"summarize": {"summary": "MUSUBI TIES KNOTS"}, "__metadata__": {"cached": True}}
    assert _executions(runs) == 1

    # A comment and a docstring are not code: still served.
    app.write_text(GRAPH_APP.replace(
        "def summarize(state: State) -> State:\n",
        'def summarize(state: State) -> State:\n    """Shout it."""  # a comment\n',
    ))
    assert _run_app(tmp_path, db, runs)["__metadata__"] == {"cached": True}
    assert _executions(runs) == 1

    # The body changed: the node runs again, with a plain CachePolicy() and no key function.
    app.write_text(GRAPH_APP.replace(".upper()", ".title()"))
    edited = _run_app(tmp_path, db, runs)
    assert edited == {"summarize": {"summary": "Musubi Ties Knots"}} and _executions(runs) == 2
    assert _run_app(tmp_path, db, runs)["__metadata__"] == {"cached": True}
    assert _executions(runs) == 2


class State(TypedDict, total=False):
    text: str
    summary: str
    answer: str


CALLS: list[str] = []


def summarize(state: State) -> State:
    CALLS.append("summarize")
    return {"summary": f"summary of {state['text']}"}


def answer(state: State) -> State:
    CALLS.append("answer")
    return {"answer": f"answer from {state['summary']}"}


def _graph(cache: MusubiNodeCache, ttl: int | None = None) -> Any:
    graph = StateGraph(State)
    graph.add_node("summarize", summarize, cache_policy=CachePolicy(ttl=ttl))
    graph.add_node("answer", answer, cache_policy=CachePolicy(ttl=ttl))
    graph.add_edge(START, "summarize")
    graph.add_edge("summarize", "answer")
    return graph.compile(cache=cache)


_MADE: list[MusubiNodeCache] = []


def _cache(*args: Any, **kwargs: Any) -> MusubiNodeCache:
    """A MusubiNodeCache closed when the test ends (its store's rows committed while the
    test's PostgreSQL server is still there)."""
    _MADE.append(MusubiNodeCache(*args, **kwargs))
    return _MADE[-1]


@pytest.fixture(autouse=True)
def _reset() -> Any:
    CALLS.clear()
    VERDICTS.clear()  # each test (and each backend's run of it) counts its own
    yield
    uninstrument()
    while _MADE:
        with contextlib.suppress(Exception):
            _MADE.pop().engine.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_hits_are_replayed_calls_of_the_graph_run_and_misses_fill_their_node(
    db: str, mode: str
) -> None:
    inst = instrument(db)
    app = _graph(_cache(engine=inst.engine))
    question = {"text": "the musubi knot ties threads together"}
    if mode == "sync":
        first, second = app.invoke(question), app.invoke(question)
    else:

        async def twice() -> tuple[Any, Any]:
            return await app.ainvoke(question), await app.ainvoke(question)

        first, second = asyncio.run(twice())
    assert first == second and CALLS == ["summarize", "answer"]
    uninstrument()

    lineage.assert_runs_are_trees(db)
    run1, run2 = lineage.runs(db, "langchain")
    nodes = {n["node_id"]: n for n in lineage.nodes(db).values() if n["kind"] == "graph_node"}
    assert sorted(n["label"] for n in nodes.values()) == ["answer", "summarize"]
    executed = [c for c in lineage.calls(db, run1["run_id"]) if c["kind"] == "graph_node"]
    replayed = [c for c in lineage.calls(db, run2["run_id"]) if c["kind"] == "graph_node"]
    # Run 1: each node's own call fills its node; run 2: a replayed call of that node.
    assert [c["op_name"] for c in executed] == ["summarize", "answer"]
    assert [c["replayed"] for c in executed] == [0, 0]
    assert {c["node_id"] for c in executed} == set(nodes)
    assert [(c["op_name"], c["replayed"]) for c in replayed] == [("summarize", 1), ("answer", 1)]
    assert [c["node_id"] for c in replayed] == [c["node_id"] for c in executed]
    root = next(c for c in lineage.calls(db, run2["run_id"]) if c["parent_call_id"] is None)
    assert {c["parent_call_id"] for c in replayed} == {root["call_id"]}
    assert run2["replays"] == 2
    # What the cached summary held flowed into the cached answer, within run 2.
    upstream = {c["call_id"] for c in lineage.upstream(db, replayed[1]["call_id"])}
    assert replayed[0]["call_id"] in upstream


def test_ttl_comes_from_the_cache_policy(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = _cache(db)
    app = _graph(cache, ttl=60)
    question = {"text": "a knot"}
    app.invoke(question)
    app.invoke(question)
    assert CALLS == ["summarize", "answer"]
    cache.flush()
    for node in cache.engine.store.list_nodes(kind="graph_node"):
        assert node.expires_at is not None and node.finished_at is not None
        assert node.expires_at - node.finished_at == pytest.approx(60, abs=1)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 61)  # a minute later
    app.invoke(question)
    assert CALLS == ["summarize", "answer", "summarize", "answer"]


def test_clear_cache_of_some_nodes_recomputes_exactly_those(db: str) -> None:
    cache = _cache(db)
    app = _graph(cache)
    question = {"text": "a knot"}
    app.invoke(question)
    app.clear_cache(["answer"])
    app.invoke(question)
    assert CALLS == ["summarize", "answer", "answer"]
    app.clear_cache()
    app.invoke(question)
    assert CALLS == ["summarize", "answer", "answer", "summarize", "answer"]
    app.invoke(question)
    assert len(CALLS) == 5


def _summary_artifact(cache: MusubiNodeCache) -> str:
    cache.flush()
    (node,) = [n for n in cache.engine.store.list_nodes(kind="graph_node") if n.label == "summarize"]
    assert node.artifact_id is not None
    return node.artifact_id


def test_a_tampered_value_is_a_miss_with_one_warning_and_never_reaches_pickle(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = _cache(db)
    app = _graph(cache)
    question = {"text": "a knot"}
    assert app.invoke(question)["summary"] == "summary of a knot"
    artifact_id = _summary_artifact(cache)

    unpickled: list[object] = []

    def refuse(*args: object, **kwargs: object) -> object:
        unpickled.append(args)
        raise AssertionError("pickle must never read a stored node value")

    for name in ("loads", "load"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)

    # Another valid value, with the old content id: never served.
    forged = JSONCodec().encode([("summary", "summary of something else")])[1]
    tamper.edit_payload(db, artifact_id, forged)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = app.invoke(question)
        out_again = app.invoke(question)  # repaired by the recomputation: served
    assert out["summary"] == out_again["summary"] == "summary of a knot"
    assert CALLS == ["summarize", "answer", "summarize"]
    mismatch = [w for w in caught if "content id" in str(w.message)]
    assert len(mismatch) == 1 and mismatch[0].category is MusubiLangChainWarning
    assert unpickled == []


def test_a_readdressed_value_naming_a_class_is_never_built(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = _cache(db)
    app = _graph(cache)
    question = {"text": "a knot"}
    app.invoke(question)
    called: list[object] = []
    monkeypatch.setattr(os, "system", lambda *a: called.append(a) or 0)
    # A payload whose id matches: only the strict decoder stands between it and os.system.
    evil = ormsgpack.packb(ormsgpack.Ext(1, ormsgpack.packb(["os", "system", ["echo pwned"]])))
    tamper.readdress(db, _summary_artifact(cache), payload=JSONCodec().encode({MSGPACK_MARK: evil})[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert app.invoke(question)["summary"] == "summary of a knot"
        app.invoke(question)
    assert called == [] and CALLS == ["summarize", "answer", "summarize"]
    blocked = [w for w in caught if "os.system is not allow-listed" in str(w.message)]
    assert len(blocked) == 1


class Verdict(BaseModel):
    label: str


VERDICTS: list[str] = []


def judge(state: MessagesState) -> dict[str, Any]:
    VERDICTS.append("judge")
    return {"messages": [AIMessage("guilty")], "verdict": Verdict(label="guilty")}


class Court(MessagesState):
    verdict: Verdict | None


def _court(cache: MusubiNodeCache) -> Any:
    graph = StateGraph(Court)
    graph.add_node("judge", judge, cache_policy=CachePolicy())
    graph.add_edge(START, "judge")
    return graph.compile(cache=cache)


def test_messages_replay_and_a_class_outside_the_allow_list_is_not_cached(db: str) -> None:
    question = {"messages": [HumanMessage("verdict?", id="q1")], "verdict": None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refused = _court(_cache(db))
        refused.invoke(question)
        refused.invoke(question)
        refused.invoke(question)
    assert VERDICTS == ["judge"] * 3  # never cached
    said = [str(w.message) for w in caught if "is not cached" in str(w.message)]
    assert len(said) == 1 and "Verdict" in said[0] and "musubi_core.allow" in said[0]

    allowed = _court(_cache(db, allow=[Verdict]))
    first = allowed.invoke(question)
    second = allowed.invoke(question)
    assert VERDICTS == ["judge"] * 4
    assert second["verdict"] == Verdict(label="guilty") and isinstance(second["verdict"], Verdict)
    assert [m.content for m in second["messages"]] == [m.content for m in first["messages"]]
    assert isinstance(second["messages"][-1], AIMessage)


def test_nodes_musubi_cannot_read_are_cached_by_name_and_said_once(db: str) -> None:
    runs: list[int] = []

    def local_node(state: State) -> State:  # defined in a function: no module path to it
        runs.append(1)
        return {"summary": "s"}

    graph = StateGraph(State)
    graph.add_node("local", local_node, cache_policy=CachePolicy())
    graph.add_edge(START, "local")
    app = graph.compile(cache=_cache(db))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            app.invoke({"text": "x"})
    assert runs == [1]
    said = [str(w.message) for w in caught if "cannot read the code" in str(w.message)]
    assert len(said) == 1 and "local_node" in said[0]


def test_a_store_that_cannot_be_opened_never_breaks_the_graph(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store's folder should be")
    app = _graph(_cache(str(blocker / "musubi.db")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            assert app.invoke({"text": "a knot"})["answer"] == "answer from summary of a knot"
    assert CALLS == ["summarize", "answer"] * 2
    assert len([w for w in caught if w.category is MusubiLangChainWarning]) == 1
