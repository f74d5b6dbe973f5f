"""The callback handler's hot paths (tool-call lookups, reused JSON encoders) give exactly the
answers of the generic paths they stand in for."""

from __future__ import annotations

import enum
from typing import Any

import pytest
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from musubi_core.record import preview
from musubi_langchain._content import _tool_calls, flow_atoms, reader


@pytest.mark.parametrize(
    "message",
    [
        HumanMessage("x"),
        HumanMessage("x", tool_calls=[{"a": 1}]),  # an extra field
        SystemMessage("s"),
        AIMessage("y", tool_calls=[{"name": "f", "args": {}, "id": "1"}]),
        AIMessageChunk(content="c"),
        ToolMessage("z", tool_call_id="1"),
    ],
    ids=lambda m: type(m).__name__,
)
def test_tool_calls_lookup_matches_getattr(message: BaseMessage) -> None:
    assert _tool_calls(message) == getattr(message, "tool_calls", None)


def test_reused_json_encoders_give_the_cores_text() -> None:
    import random

    from musubi_core.fastpath import plain_input_hash, plain_payload, plain_tree
    from musubi_langchain._engine import canonical_json, compact_json

    rng = random.Random(7)
    leaves: list[Any] = ["", "a", "é東京", "line\nbreak", '"q"', "\u2028", "lone\udc80", 0, -7, 2**70]
    leaves += [True, False, None, 0.5, -0.0, 1e300]

    def value(depth: int = 0) -> Any:
        pick = rng.randrange(3 if depth < 4 else 1)
        if pick == 0:
            return rng.choice(leaves)
        if pick == 1:
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        return {rng.choice(["b", "a", "é", "z1"]): value(depth + 1) for _ in range(rng.randrange(4))}

    import hashlib

    for _ in range(300):
        tree = plain_tree(value())
        text = canonical_json(tree).encode("utf-8", "surrogatepass")
        assert hashlib.sha256(text).hexdigest() == plain_input_hash(tree)
        assert compact_json(tree).encode("utf-8", "surrogatepass") == plain_payload(tree)


class _Choice(str, enum.Enum):
    LONG = "a long enough value"


_TEMPLATE = ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{question}")])


@pytest.mark.parametrize(
    "value",
    [
        {"question": "what ties things?"},
        {},
        {"a": 1, "b": None, "c": 2.5, "d": True, "e": "x" * 200},
        {"a": "é東京 text", 1: "a non-str key"},
        {"k": "a" * 74, "j": "b" * 75},  # just short enough for one preview
        {"k": "a" * 76, "j": "b" * 76},  # just too long
        {"nested": [1, {"x": "deep text"}]},
        [HumanMessage("hi there"), AIMessage("ok", tool_calls=[{"name": "f", "args": {"x": "an arg"}, "id": "1"}])],
        [SystemMessage("s" * 100), HumanMessage("h" * 100)],
        [SystemMessage("lone\udc80 é")],
        [HumanMessage("x", tool_calls=[{"args": {"k": "an extra field"}}])],
        [],
        [1, "two", None],
        _TEMPLATE.invoke({"question": "what ties things?"}),
        AIMessage("echo: what"),
        AIMessage("x" * 300),
        AIMessage("lone\udc80"),
        AIMessage([{"type": "text", "text": "a content block"}]),
        ToolMessage("a tool's result", tool_call_id="1"),
        StrOutputParser().invoke(AIMessage("parsed text")),
        _Choice.LONG,
    ],
    ids=lambda v: type(v).__name__,
)
def test_readers_give_the_generic_preview_and_atoms(value: Any) -> None:
    kept: list[Any] = []
    generic_kept: list[Any] = []
    text, atoms = reader(type(value))(value, kept)
    assert text == preview(value)
    assert atoms == frozenset(flow_atoms(value, generic_kept))
    assert sorted(map(id, kept)) == sorted(map(id, generic_kept))
