"""The callback handler's hot paths (staged rows, model keys, tool-call lookups) give exactly
the answers of the generic paths they stand in for."""

from __future__ import annotations

import os
import sqlite3
import uuid
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

from musubi_core import SQLiteStore
from musubi_core.engine import artifact_id_for
from musubi_core.store import ArtifactWrite, EdgeWrite, NodeWrite
from musubi_langchain import MusubiCallbackHandler
from musubi_langchain._content import _tool_calls, to_plain
from musubi_langchain._engine import (
    _ARTIFACT_WIDTH,
    _EDGE_WIDTH,
    _NODE_WIDTH,
    NodeRow,
    WriteBehindEngine,
)
from musubi_langchain._keys import canonical_message_objects
from musubi_langchain._runs import Run, Trace
from musubi_langchain.handler import _VOLATILE_PARAMS


def test_row_widths_match_the_write_objects() -> None:
    assert len(NodeWrite._fields) == _NODE_WIDTH
    assert len(EdgeWrite._fields) == _EDGE_WIDTH
    assert len(ArtifactWrite._fields) == _ARTIFACT_WIDTH


def _slow_model_key(handler: MusubiCallbackHandler, run: Run) -> Any:
    params = {
        k: v for k, v in (run.params or {}).items() if k not in _VOLATILE_PARAMS and v is not None
    }
    inputs = {"messages": canonical_message_objects(run.messages), "params": to_plain(params)}
    return handler.engine.key(f"{run.kind}:{run.name}", inputs)


_PARAMS: list[Any] = [
    None,
    {},
    {"model_name": "m", "temperature": 0.0, "_type": "fake", "stop": None},
    {"model_name": "m", "temperature": -0.0, "_type": "fake", "stop": None},
    {"model_name": "m", "temperature": 1.0},
    {"model_name": "m", "temperature": 1},
    {"model_name": "m", "temperature": True},
    {"model_name": "m", "temperature": "1"},
    {"model_name": "m", "stop": ["\n", "END"], "stream": True, "max_retries": 3},
    {"model_name": "m", "response_format": {"type": "json_object"}, "seed": 2**70},
    {"model_name": "é東京", "top_p": 0.95, "n": None},
    {"model_name": "m", "schema": (1, 2.5)},
    {"model_name": "m", "obj": object()},
]
_MESSAGE_LISTS: list[list[BaseMessage]] = [
    [SystemMessage("Be brief."), HumanMessage("q1")],
    [HumanMessage("hi", name="bob", id="x1"), HumanMessage("", name="")],
    [HumanMessage("x", additional_kwargs={"k": 1}), HumanMessage([{"type": "text", "text": "a"}])],
    [
        HumanMessage("what is 2+2?"),
        AIMessage("", tool_calls=[{"name": "add", "args": {"a": 2, "b": 2}, "id": "call_9"}]),
        ToolMessage("4", tool_call_id="call_9"),
    ],
    [HumanMessage("t", additional_kwargs={"k": (1, 2)}), SystemMessage("\udc80 lone")],
    [],
]


@pytest.mark.parametrize("params", _PARAMS, ids=range(len(_PARAMS)))
def test_fast_model_key_equals_the_generic_key(tmp_path: Any, params: Any) -> None:
    handler = MusubiCallbackHandler(str(tmp_path / "m.db"))
    for messages in _MESSAGE_LISTS:
        run = Run(uuid.uuid4(), None, Trace(), "chat_model", "FakeModel")
        run.messages, run.params = messages, params
        slow = _slow_model_key(handler, run)
        for _ in range(2):  # the second time from the params memo
            assert handler._model_key(run) == slow
    handler.engine.close()


def test_model_key_params_memo_tells_equal_values_of_other_types_apart(tmp_path: Any) -> None:
    handler = MusubiCallbackHandler(str(tmp_path / "m.db"))
    keys = set()
    for value in (0.0, -0.0, 0, False, 1, 1.0, True, "1", None):
        run = Run(uuid.uuid4(), None, Trace(), "chat_model", "m")
        run.messages, run.params = [HumanMessage("q")], {"t": value}
        key = handler._model_key(run)
        assert key == _slow_model_key(handler, run)
        keys.add(key.node_id)
    assert len(keys) == 9  # None is dropped (params {}), the others all differ
    handler.engine.close()


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


def _row(engine: WriteBehindEngine, node_id: str, artifact_id: str | None) -> NodeRow:
    return (
        node_id, "op", "op", "tool", "deterministic", "h", "done", artifact_id, engine.namespace,
        None, 1.0, None, 0.1, None, None, None, None, "label", None, None, 1,
    )


def test_staged_rows_are_seen_by_lookups_and_yield_to_newer_writes(tmp_path: Any) -> None:
    engine = WriteBehindEngine(SQLiteStore(str(tmp_path / "m.db")))
    key = engine.key("op", 1)
    encoding, payload = engine.codec.encode("staged")
    art = artifact_id_for(encoding, payload)
    engine.stage(
        _row(engine, key.node_id, art),
        (art, encoding, payload, key.node_id),
        [("p" * 64, key.node_id, "contains", None)],
    )
    found = engine.lookup(key)  # before any commit: the staged row is visible
    assert found.replay and found.value == "staged"
    # A newer deferred write of the same node wins over the staged row.
    engine.stage(_row(engine, key.node_id, art), (art, encoding, payload, key.node_id), [])
    with engine.deferring():
        engine.record(key, "newer", defer=True)
    engine.flush()
    assert engine.lookup(key).value == "newer"
    con = sqlite3.connect(str(tmp_path / "m.db"))
    edges = con.execute("SELECT parent, kind FROM musubi_edges WHERE child = ?", (key.node_id,))
    assert edges.fetchall() == [("p" * 64, "contains")]
    con.close()
    assert not engine._staged_nodes and not engine._staged_edges and not engine._staged_ids
    engine.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_drops_the_parents_staged_rows(tmp_path: Any) -> None:
    engine = WriteBehindEngine(SQLiteStore(str(tmp_path / "m.db")))
    engine.stage(_row(engine, "n" * 64, None), None, [("p" * 64, "n" * 64, "contains", None)])
    pid = os.fork()
    if pid == 0:  # the parent commits these rows; the child must not repeat them
        os._exit(0 if not (engine._staged_nodes or engine._staged_edges or engine._staged_ids) else 1)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    engine.flush()
    assert engine.store.get_node("n" * 64) is not None
    engine.close()


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
