"""Tool replay, opt-in per tool, in a real LangGraph ReAct agent (real ChatOpenAI against the
local server): the declared deterministic tool replays, the undeclared one runs; an
external-effect tool is never issued twice, and one whose outcome a crash lost is refused."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import uuid
import warnings
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from musubi_langchain import declare_tool, instrument, uninstrument
from tests.support import lineage
from tests.support.openai_server import ChatReply, OpenAIServer, ToolCall

# Runs on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_BACKENDS = True

langgraph_prebuilt = pytest.importorskip("langgraph.prebuilt")

EXECUTED: list[str] = []


@tool
def get_weather(city: str) -> str:
    """Weather for a city."""
    EXECUTED.append("get_weather")
    return f"Sunny and 21C in {city}"


@tool
def local_time(city: str) -> str:
    """The local time in a city."""
    EXECUTED.append("local_time")
    return f"It is noon in {city}"


def _two_tools_rule(body: dict[str, Any]) -> ChatReply:
    """Ask for both tools (fresh provider ids each time), then answer from their results."""
    results = [m["content"] for m in body["messages"] if m.get("role") == "tool"]
    if not results:
        return ChatReply(tool_calls=[
            ToolCall("get_weather", {"city": "Paris"}, id=f"call_{uuid.uuid4().hex}"),
            ToolCall("local_time", {"city": "Paris"}, id=f"call_{uuid.uuid4().hex}"),
        ])
    return ChatReply(content="Final: " + " / ".join(sorted(results)))


def _agent(chat: ChatOpenAI) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # create_react_agent moved in 1.x
        return langgraph_prebuilt.create_react_agent(chat, [get_weather, local_time])


@pytest.fixture(autouse=True)
def _reset() -> Any:
    EXECUTED.clear()
    get_weather.metadata = None
    yield
    uninstrument()
    get_weather.metadata = None


def _ask(agent: Any) -> str:
    out = agent.invoke({"messages": [HumanMessage("Weather and time in Paris?")]})
    return str(out["messages"][-1].content)


@pytest.mark.parametrize("declared_on", ["instrument", "tool"])
def test_react_agent_run_2_replays_the_model_and_the_declared_tool_only(
    db: str, chat: ChatOpenAI, openai_server: OpenAIServer, declared_on: str
) -> None:
    openai_server.set_chat_rule(_two_tools_rule)
    if declared_on == "tool":
        declare_tool(get_weather, "deterministic")
        instrument(db)
    else:
        instrument(db, tools={"get_weather": "deterministic"})
    first = _ask(_agent(chat))
    assert first == "Final: It is noon in Paris / Sunny and 21C in Paris"
    assert openai_server.chat_count == 2
    assert sorted(EXECUTED) == ["get_weather", "local_time"]

    openai_server.clear_log()
    assert _ask(_agent(chat)) == first
    assert openai_server.chat_count == 0  # both model turns replayed
    # The declared tool replayed; the undeclared one ran again, as it always did.
    assert sorted(EXECUTED) == ["get_weather", "local_time", "local_time"]
    uninstrument()

    lineage.assert_runs_are_trees(db)
    run1, run2 = lineage.runs(db, "langchain")
    for run, replayed in ((run1, 0), (run2, 1)):
        calls = lineage.calls(db, run["run_id"])
        declared = [c for c in calls if c["kind"] == "tool_step"]
        plain = [c for c in calls if c["kind"] == "tool"]
        assert [(c["op_name"], c["replayed"]) for c in declared] == [("get_weather", replayed)]
        assert declared[0]["node_id"] is not None
        assert [(c["op_name"], c["replayed"]) for c in plain] == [("local_time", 0)]
        models = [c for c in calls if c["kind"] == "chat_model"]
        assert [m["replayed"] for m in models] == [replayed, replayed]
    nodes = lineage.nodes(db)
    (tool_node,) = [n for n in nodes.values() if n["kind"] == "tool_step"]
    assert tool_node["op_name"] == "tool:get_weather" and tool_node["step_type"] == "deterministic"
    # The model turn that asked for the tool is upstream of the tool's node (invalidation).
    model_nodes = {n for n, rec in nodes.items() if rec["kind"] == "chat_model"}
    parents = {p for p, c in lineage.node_edges(db) if c == tool_node["node_id"]}
    assert parents & model_nodes


def test_async_agent_replays_the_declared_tool(
    db: str, chat: ChatOpenAI, openai_server: OpenAIServer
) -> None:
    openai_server.set_chat_rule(_two_tools_rule)
    instrument(db, tools={"get_weather": "deterministic"})

    async def twice() -> tuple[Any, Any]:
        agent = _agent(chat)
        question = {"messages": [HumanMessage("Weather and time in Paris?")]}
        return await agent.ainvoke(question), await agent.ainvoke(question)

    first, second = asyncio.run(twice())
    assert first["messages"][-1].content == second["messages"][-1].content
    assert openai_server.chat_count == 2
    assert sorted(EXECUTED) == ["get_weather", "local_time", "local_time"]


def test_a_tool_edit_runs_it_again_and_other_arguments_miss(db: str) -> None:
    instrument(db, tools={"get_weather": "deterministic"})
    assert get_weather.invoke({"city": "Paris"}) == get_weather.invoke({"city": "Paris"})
    get_weather.invoke({"city": "Kyoto"})
    assert EXECUTED == ["get_weather", "get_weather"]
    uninstrument()

    @tool("get_weather")
    def edited(city: str) -> str:
        """Weather for a city (a new implementation under the same name)."""
        EXECUTED.append("edited")
        return f"Rain in {city}"

    instrument(db, tools={"get_weather": "deterministic"})
    assert edited.invoke({"city": "Paris"}) == "Rain in Paris"
    assert EXECUTED == ["get_weather", "get_weather", "edited"]


SENT: list[str] = []


@tool
def send_invoice(customer: str, amount: int) -> str:
    """Send an invoice."""
    SENT.append(customer)
    return f"invoice {len(SENT)} sent to {customer}"


def test_an_external_effect_tool_is_never_issued_twice(db: str) -> None:
    SENT.clear()
    instrument(db, tools={"send_invoice": "external_effect"})
    first = send_invoice.invoke({"customer": "ana", "amount": 3})
    again = send_invoice.invoke({"customer": "ana", "amount": 3})
    assert first == again == "invoice 1 sent to ana" and SENT == ["ana"]
    send_invoice.invoke({"customer": "bo", "amount": 3})
    assert SENT == ["ana", "bo"]
    uninstrument()
    # Undeclared: the tool runs as LangChain runs it.
    send_invoice.invoke({"customer": "ana", "amount": 3})
    assert SENT == ["ana", "bo", "ana"]


EFFECT_SCRIPT = """
import os, sys
from langchain_core.tools import tool
from musubi_langchain import instrument

@tool
def charge(card: str) -> str:
    \"\"\"Charge a card.\"\"\"
    with open(os.environ["CHARGES"], "a") as f:
        f.write(card + "\\n")
    if os.environ.get("CRASH"):
        os._exit(3)  # the process dies after the effect, before its outcome is stored
    return "charged " + card

instrument(sys.argv[1], tools={"charge": "external_effect"})
try:
    print(charge.invoke({"card": "4242"}))
except Exception as exc:
    print(type(exc).__name__)
"""


def test_an_effect_a_crash_left_in_doubt_is_refused_not_repeated(tmp_path: Path) -> None:
    script, db, charges = tmp_path / "charge.py", tmp_path / "m.db", tmp_path / "charges.txt"
    script.write_text(textwrap.dedent(EFFECT_SCRIPT))

    def run(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(script), str(db)], capture_output=True, text=True,
            env={**os.environ, "CHARGES": str(charges), **env}, timeout=300, check=False,
        )

    crashed = run(CRASH="1")
    assert crashed.returncode == 3
    refused = run()
    assert refused.returncode == 0, refused.stderr
    assert refused.stdout.strip() == "EffectInDoubtError"
    assert charges.read_text().splitlines() == ["4242"]  # charged once, never again
