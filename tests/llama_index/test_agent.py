"""A function-calling agent's second run replays every LLM call (tool calls included)."""

from __future__ import annotations

import asyncio
from typing import Any

from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.tools import FunctionTool

from musubi_llama_index import instrument
from tests.support.openai_server import ChatReply, OpenAIServer, ToolCall

# Runs on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_BACKENDS = True


def test_function_agent_second_run_replays(
    openai_server: OpenAIServer, db_path: str, llm: Any
) -> None:
    calls: list[tuple[int, int]] = []

    def add(a: int, b: int) -> int:
        """Add two integers."""
        calls.append((a, b))
        return a + b

    openai_server.enqueue_chat(
        ChatReply(tool_calls=[ToolCall("add", {"a": 2, "b": 3}, id="call_1")]),
        ChatReply(content="The sum is 5."),
    )
    instrument(db_path, llm=llm)

    async def run() -> str:
        agent = FunctionAgent(tools=[FunctionTool.from_defaults(add)], llm=llm)
        return str(await agent.run("What is 2 + 3?"))

    first = asyncio.run(run())
    assert "The sum is 5." in first
    assert openai_server.count("chat") == 2
    assert calls == [(2, 3)]
    # the tool schema went to the provider
    assert openai_server.requests[0].body["tools"][0]["function"]["name"] == "add"

    openai_server.clear_log()
    second = asyncio.run(run())
    assert openai_server.count() == 0, openai_server.counts()
    assert second == first
    # Tools are not LLM calls: the agent ran the (replayed) tool call again.
    assert calls == [(2, 3), (2, 3)]
    # Each agent run is a workflow run: its steps, the tool call and the LLM calls (replayed
    # the second time) are calls of it, in one tree.
    from musubi_llama_index import uninstrument
    from tests.support import lineage as lin

    uninstrument()
    lin.assert_runs_are_trees(db_path)
    runs = lin.runs(db_path, "workflow")
    assert len(runs) == 2
    for run, replayed in zip(runs, (0, 1), strict=True):
        run_calls = lin.calls(db_path, run["run_id"])
        assert any(c["kind"] == "tool" and c["op_name"].endswith("(add)") for c in run_calls)
        assert any(c["kind"] == "workflow_step" for c in run_calls)
        models = [c for c in run_calls if c["kind"] == "llm" and c["node_id"]]
        assert len(models) == 2 and {c["replayed"] for c in models} == {replayed}


def test_chat_with_tools_sync_replays_tool_calls(
    openai_server: OpenAIServer, db_path: str, llm: Any
) -> None:
    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    tool = FunctionTool.from_defaults(multiply)
    openai_server.enqueue_chat(
        ChatReply(tool_calls=[ToolCall("multiply", {"a": 6, "b": 7}, id="call_9")])
    )
    instrument(db_path, llm=llm)
    r1 = llm.chat_with_tools([tool], user_msg="6 times 7?")
    sel1 = llm.get_tool_calls_from_response(r1)
    r2 = llm.chat_with_tools([tool], user_msg="6 times 7?")
    sel2 = llm.get_tool_calls_from_response(r2)
    assert openai_server.count("chat") == 1
    assert [(s.tool_id, s.tool_name, s.tool_kwargs) for s in sel2] == [
        (s.tool_id, s.tool_name, s.tool_kwargs) for s in sel1
    ] == [("call_9", "multiply", {"a": 6, "b": 7})]
    # predict_and_call runs the replayed tool call
    openai_server.enqueue_chat(
        ChatReply(tool_calls=[ToolCall("multiply", {"a": 6, "b": 7}, id="call_9")])
    )
    out = llm.predict_and_call([tool], user_msg="6 times 7?")
    assert str(out) == "42"
    assert openai_server.count("chat") == 1
