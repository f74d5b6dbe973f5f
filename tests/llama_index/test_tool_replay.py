"""Tool replay, opt-in per tool, for LlamaIndex ``FunctionTool``s in a real ``FunctionAgent``
(real OpenAI LLM class against the local server): run 2 makes zero model requests and zero
executions of the declared tool, while the undeclared tool runs again."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.tools import FunctionTool

from musubi_llama_index import declare_tool, instrument, uninstrument
from tests.support import lineage as lin
from tests.support.openai_server import ChatReply, OpenAIServer, ToolCall

# Runs on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_BACKENDS = True

EXECUTED: list[str] = []


def add(a: int, b: int) -> int:
    """Add two integers."""
    EXECUTED.append("add")
    return a + b


def note(text: str) -> str:
    """Write a note down."""
    EXECUTED.append("note")
    return f"noted: {text}"


def _script(server: OpenAIServer) -> None:
    server.enqueue_chat(
        ChatReply(tool_calls=[ToolCall("add", {"a": 2, "b": 3}, id="call_1")]),
        ChatReply(tool_calls=[ToolCall("note", {"text": "the sum is 5"}, id="call_2")]),
        ChatReply(content="The sum is 5, and it is noted."),
    )


def _run(llm: Any, tools: list[FunctionTool]) -> str:
    async def go() -> str:
        agent = FunctionAgent(tools=tools, llm=llm)
        return str(await agent.run("Add 2 and 3, then note the result."))

    return asyncio.run(go())


@pytest.fixture(autouse=True)
def _reset() -> Any:
    EXECUTED.clear()
    yield
    uninstrument()


@pytest.mark.parametrize("declared_on", ["instrument", "tool"])
def test_function_agent_run_2_replays_the_model_and_the_declared_tool_only(
    openai_server: OpenAIServer, db_path: str, llm: Any, declared_on: str
) -> None:
    tools = [FunctionTool.from_defaults(add), FunctionTool.from_defaults(note)]
    if declared_on == "tool":
        declare_tool(tools[0], "deterministic")
        instrument(db_path, llm=llm)
    else:
        instrument(db_path, llm=llm, tools={"add": "deterministic"})
    _script(openai_server)
    first = _run(llm, tools)
    assert "noted" in first and openai_server.count("chat") == 3
    assert EXECUTED == ["add", "note"]

    openai_server.clear_log()
    fresh = [FunctionTool.from_defaults(add), FunctionTool.from_defaults(note)]
    if declared_on == "tool":
        declare_tool(fresh[0], "deterministic")
    assert _run(llm, fresh) == first
    assert openai_server.count() == 0, openai_server.counts()
    assert EXECUTED == ["add", "note", "note"]  # add replayed; note ran, as it always did
    uninstrument()

    lin.assert_runs_are_trees(db_path)
    runs = lin.runs(db_path, "workflow")
    assert len(runs) == 2
    for run, replayed in zip(runs, (0, 1), strict=True):
        calls = lin.calls(db_path, run["run_id"])
        declared = [c for c in calls if c["kind"] == "tool_step"]
        plain = [c for c in calls if c["kind"] == "tool"]
        assert [(c["op_name"].endswith("(add)"), c["replayed"]) for c in declared] == [
            (True, replayed)
        ]
        assert declared[0]["node_id"] is not None
        assert [c["op_name"].endswith("(note)") for c in plain] == [True]
        models = [c for c in calls if c["kind"] == "llm" and c["node_id"]]
        assert len(models) == 3 and {c["replayed"] for c in models} == {replayed}
    (tool_node,) = [n for n in lin.nodes(db_path).values() if n["kind"] == "tool_step"]
    assert tool_node["op_name"] == "tool:add"


def test_sync_calls_replay_and_an_external_effect_is_issued_once(db_path: str) -> None:
    sent: list[str] = []

    def send(to: str) -> str:
        """Send a message."""
        sent.append(to)
        return f"sent to {to}"

    adder = FunctionTool.from_defaults(add)
    sender = declare_tool(FunctionTool.from_defaults(send), "external_effect")
    instrument(db_path, tools={"add": "deterministic"})
    assert adder.call(a=1, b=2).raw_output == adder(a=1, b=2).raw_output == 3
    assert adder.call(a=1, b=3).raw_output == 4
    assert EXECUTED == ["add", "add"]
    assert str(sender.call(to="ana")) == str(sender.call(to="ana")) == "sent to ana"
    assert sent == ["ana"]
    uninstrument()
    # Undeclared (or not instrumented): tools run as LlamaIndex runs them.
    adder.call(a=1, b=2)
    assert EXECUTED == ["add", "add", "add"]
