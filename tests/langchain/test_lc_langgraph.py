"""A real LangGraph ReAct agent (a tool, ``InMemorySaver``, real ``ChatOpenAI`` against the local
server) recorded by ``instrument()``: each invocation is a run whose calls form a tree, distinct
runnables are distinct calls, runs never bleed into each other, and the model turns replay."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI
from test_lc_cache import _agent_rule, get_weather

from musubi_langchain import instrument, uninstrument
from tests.support import lineage
from tests.support.openai_server import OpenAIServer

# Runs on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_BACKENDS = True

langgraph_prebuilt = pytest.importorskip("langgraph.prebuilt")
from langgraph.checkpoint.memory import InMemorySaver  # noqa: E402


def _agent(chat: ChatOpenAI) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # create_react_agent moved in 1.x
        return langgraph_prebuilt.create_react_agent(
            chat, [get_weather], checkpointer=InMemorySaver()
        )


def _ask(agent: Any, thread: str) -> str:
    out = agent.invoke(
        {"messages": [HumanMessage("Weather in Paris?")]},
        config={"configurable": {"thread_id": thread}},
    )
    return str(out["messages"][-1].content)


def test_react_agent_runs_are_trees_and_never_bleed(
    db: str, chat: ChatOpenAI, openai_server: OpenAIServer
) -> None:
    openai_server.set_chat_rule(_agent_rule)
    instrument(db)
    agent = _agent(chat)
    first = _ask(agent, "t1")
    assert first == "Final: Sunny and 21C in Paris today"
    assert openai_server.chat_count == 2
    # A new thread, same question: both model turns replay (the tool runs: tools are recorded).
    assert _ask(agent, "t2") == first
    assert openai_server.chat_count == 2
    uninstrument()

    lineage.assert_runs_are_trees(db)
    run1, run2 = lineage.runs(db)
    assert run1["kind"] == run2["kind"] == "langchain" and run1["status"] == "done"
    calls1, calls2 = lineage.calls(db, run1["run_id"]), lineage.calls(db, run2["run_id"])
    # One root per run (the graph), every other call under a parent of the same run.
    assert [c["parent_call_id"] for c in calls1].count(None) == 1
    assert calls1[0]["op_name"] == "LangGraph"
    models1 = [c for c in calls1 if c["kind"] == "chat_model"]
    tools1 = [c for c in calls1 if c["kind"] == "tool"]
    assert len(models1) == 2 and len(tools1) == 1
    # Distinct runnables are distinct calls: the graph's nodes ("agent" twice, "tools" once) are
    # each their own call, and each model turn sits under its own "agent" node call.
    agent_nodes = [c for c in calls1 if c["op_name"] == "agent"]
    assert len(agent_nodes) == 2
    for model, node in zip(models1, agent_nodes, strict=True):
        assert node["call_id"] in {a["call_id"] for a in lineage.ancestors(db, model["call_id"])}
    # The tool's answer flowed into the second turn, within the run.
    upstream_of_turn2 = {c["call_id"] for c in lineage.upstream(db, models1[1]["call_id"])}
    assert tools1[0]["call_id"] in upstream_of_turn2
    assert "Sunny" in lineage.artifact_text(db, tools1[0]["artifact_id"])
    # Run 2: the turns replay the nodes run 1 recorded; its lineage stays in run 2.
    models2 = [c for c in calls2 if c["kind"] == "chat_model"]
    assert [m["replayed"] for m in models2] == [1, 1]
    assert [m["node_id"] for m in models2] == [m["node_id"] for m in models1]
    for call in calls2:
        assert {c["run_id"] for c in lineage.upstream(db, call["call_id"])} <= {run2["run_id"]}
    assert run2["replays"] == 2 and run2["tokens_saved"] > 0
