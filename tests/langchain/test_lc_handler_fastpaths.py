"""The callback handler's hot paths (tool-call lookups, reused JSON encoders) give exactly the
answers of the generic paths they stand in for."""

from __future__ import annotations

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

from musubi_langchain._content import _tool_calls


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
