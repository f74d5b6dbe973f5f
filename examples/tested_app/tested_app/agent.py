"""A tool-calling agent: a planning turn (streamed) picks tools, the tools run, an answering
turn writes the reply from their results."""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import AIMessageChunk, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool

from tested_app.config import chat_model
from tested_app.prompts import ANSWER_SYSTEM, PLANNER_SYSTEM

_WEATHER = {"Lisbon": (21, "sunny"), "Oslo": (4, "snowing"), "Kyoto": (15, "raining")}


@tool
def get_weather(city: str) -> str:
    """Current weather in a city: temperature in Celsius and the sky."""
    celsius, sky = _WEATHER.get(city, (10, "cloudy"))
    return f"{celsius} C, {sky}"


@tool
def to_fahrenheit(celsius: float) -> float:
    """Convert a temperature from Celsius to Fahrenheit."""
    return round(celsius * 9 / 5 + 32, 1)


TOOLS = {t.name: t for t in (get_weather, to_fahrenheit)}


@dataclass
class AgentResult:
    answer: str
    tool_calls: list[tuple[str, dict[str, Any]]]
    tool_results: list[str]


def run_agent(question: str) -> AgentResult:
    planner = chat_model().bind_tools(list(TOOLS.values()))
    plan_input = [SystemMessage(PLANNER_SYSTEM), HumanMessage(question)]
    # The planning turn is streamed: its tool calls arrive in chunks.
    plan: AIMessageChunk = functools.reduce(operator.add, planner.stream(plan_input))
    results = [
        ToolMessage(str(TOOLS[call["name"]].invoke(call["args"])), tool_call_id=call["id"])
        for call in plan.tool_calls
    ]
    reply = chat_model().invoke(
        [SystemMessage(ANSWER_SYSTEM), HumanMessage(question), plan, *results]
    )
    return AgentResult(
        answer=str(reply.content),
        tool_calls=[(c["name"], dict(c["args"])) for c in plan.tool_calls],
        tool_results=[str(m.content) for m in results],
    )
