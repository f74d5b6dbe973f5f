"""Conformance, part two: the record of what happened (calls, flows, runs) and the recorder.

Imported by :mod:`musubi_core.testing.conformance`, so a backend that runs that suite runs these
too (they use its ``store`` and ``store_factory`` fixtures).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from ..errors import NodeNotFoundError
from ..record import RunState, recorder_for
from ..store.base import CallWrite, EdgeWrite, FlowWrite, RunWrite, Store

__all__ = [
    "call",
    "test_calls_recorder_commits_in_one_transaction_with_nodes",
    "test_calls_resolve_and_node_calls",
    "test_calls_run_row_is_an_upsert_and_lists_filter",
    "test_calls_write_then_read_in_run_order",
    "test_calls_lineage_follows_flows_and_reports_cuts",
    "test_calls_run_flows_are_the_flows_into_a_runs_calls",
    "test_calls_usage_groups_by_model_kind_run_and_bucket",
    "test_store_invalidation_set_is_exactly_what_invalidate_marks",
]

RUN = "run-conformance"


def call(call_id: str, seq: int, *, run_id: str = RUN, parent: str | None = None, **extra: Any) -> CallWrite:
    """A :class:`CallWrite` with sensible defaults for the tests."""
    fields: dict[str, Any] = {
        "node_id": None,
        "artifact_id": None,
        "replayed": 0,
        "status": "done",
        "error": None,
        "started_at": 1_000.0 + seq,
        "duration_s": 0.5,
        "tokens_in": None,
        "tokens_out": None,
        "saved_s": None,
        "model": None,
        "input_preview": f"in {call_id}",
        "output_preview": f"out {call_id}",
        "namespace": "default",
    }
    fields.update(extra)
    return CallWrite(
        call_id=call_id,
        run_id=run_id,
        parent_call_id=parent,
        seq=seq,
        kind=fields.pop("kind", "chain"),
        op_name=fields.pop("op_name", f"op-{call_id}"),
        **fields,
    )


def _run(run_id: str = RUN, **extra: Any) -> RunWrite:
    fields: dict[str, Any] = {
        "kind": "script",
        "name": "conformance",
        "status": "running",
        "started_at": time.time(),
        "finished_at": None,
        "duration_s": None,
        "host": "h",
        "pid": 1,
        "error": None,
        "namespace": "default",
        "root_call_id": None,
        "calls": 0,
        "replays": 0,
        "tokens_in": 0,
        "tokens_out": 0,
        "tokens_saved": 0,
        "seconds_saved": 0.0,
    }
    fields.update(extra)
    return RunWrite(run_id=run_id, **fields)


def test_calls_write_then_read_in_run_order(store: Store) -> None:
    rows = [call("c0", 0), call("c1", 1, parent="c0", kind="chat_model", tokens_in=3, tokens_out=4)]
    store.write(calls=list(reversed(rows)), flows=[FlowWrite("c1", "c0", "a" * 64)])
    assert store.run_calls(RUN) == rows  # every field back, in seq order
    assert store.get_call("c1") == rows[1]
    assert store.get_call("nope") is None
    assert store.call_flows("c1") == [FlowWrite("c1", "c0", "a" * 64)]
    # A flow written twice is one flow; a call written again (its end) replaces its row.
    done = rows[1]._replace(status="failed", error="boom", output_preview=None)
    store.write(calls=[done], flows=[FlowWrite("c1", "c0", "a" * 64)])
    assert store.get_call("c1") == done
    assert len(store.call_flows("c0")) == 1


def test_calls_run_row_is_an_upsert_and_lists_filter(store: Store) -> None:
    store.write(runs=[_run("r1", kind="langchain"), _run("r2", kind="step", status="done")])
    finished = _run("r1", kind="langchain", status="done", calls=5, replays=2, tokens_saved=9,
                    seconds_saved=1.5, root_call_id="c0", finished_at=time.time(), duration_s=2.0)
    store.write(runs=[finished])
    got = store.get_run("r1")
    assert got is not None
    assert (got.status, got.calls, got.replays, got.tokens_saved, got.seconds_saved) == (
        "done", 5, 2, 9, 1.5,
    )
    assert got.kind == "langchain" and got.root_call_id == "c0" and got.duration_s == 2.0
    assert {r.run_id for r in store.list_runs()} == {"r1", "r2"}
    assert [r.run_id for r in store.list_runs(kind="step")] == ["r2"]
    assert [r.run_id for r in store.list_runs(status="done", kind="langchain")] == ["r1"]
    assert store.list_runs(since=time.time() + 60) == []
    assert store.resolve_run("r1") == "r1"
    with pytest.raises(NodeNotFoundError, match="musubi runs"):
        store.resolve_run("zz")


def test_calls_resolve_and_node_calls(store: Store) -> None:
    node_id = "e" * 64
    store.write(
        calls=[
            call("abc100", 0, node_id=node_id),
            call("abc200", 1, node_id=node_id, replayed=1, run_id="other"),
            call("fff", 2),
        ]
    )
    assert store.resolve_call("fff") == "fff"
    assert store.resolve_call("abc1") == "abc100"
    assert store.resolve_call("0123") is None
    with pytest.raises(NodeNotFoundError, match="ambiguous"):
        store.resolve_call("abc")
    assert [c.call_id for c in store.node_calls(node_id)] == ["abc200", "abc100"]  # newest first


def test_calls_lineage_follows_flows_and_reports_cuts(store: Store) -> None:
    # c0 -> c1 -> c2 -> c3 (flows), and an unrelated c9 in another run feeding nothing here.
    rows = [call(f"c{i}", i) for i in range(4)] + [call("c9", 0, run_id="other")]
    flows = [FlowWrite(f"c{i + 1}", f"c{i}", None) for i in range(3)]
    flows.append(FlowWrite("c9", "c0", None))
    store.write(calls=rows, flows=flows)
    calls, found, cut = store.call_lineage("c3")
    assert [c.call_id for c in calls] == ["c0", "c1", "c2", "c3"] and not cut
    assert len(found) == 3
    calls, _found, cut = store.call_lineage("c3", depth=1)
    assert [c.call_id for c in calls] == ["c2", "c3"] and cut
    calls, _found, _cut = store.call_lineage("c0", upstream=False, downstream=True)
    assert {c.call_id for c in calls} == {"c0", "c1", "c2", "c3", "c9"}


def test_calls_recorder_commits_in_one_transaction_with_nodes(store: Store) -> None:
    from .conformance import done_node

    node_id = done_node(store, "recorded")
    rec = recorder_for(store)
    run = RunState(rec, "script", "conformance")
    run.record("k0", None, "step", "op", node_id=node_id, replayed=True, tokens_in=2, tokens_out=3,
               saved_s=0.25)
    rec.replay(node_id)
    rec.submit(runs=(run.row("done"),))
    assert rec.backlog > 0
    rec.flush()
    assert rec.backlog == 0
    got = store.get_run(run.run_id)
    assert got is not None and (got.calls, got.replays, got.tokens_saved) == (1, 1, 5)
    assert got.root_call_id == "k0" and got.seconds_saved == 0.25
    (only,) = store.run_calls(run.run_id)
    assert only.node_id == node_id and only.replayed == 1
    stored = store.get_node(node_id)
    assert stored is not None and stored.replay_count == 1


def test_calls_run_flows_are_the_flows_into_a_runs_calls(store: Store) -> None:
    rows = [call("a0", 0), call("a1", 1), call("a2", 2), call("b0", 0, run_id="other")]
    flows = [FlowWrite("a1", "a0", None), FlowWrite("a2", "a1", "f" * 64), FlowWrite("b0", "a2")]
    store.write(calls=rows, flows=flows)
    assert store.run_flows(RUN) == flows[:2]  # in the order of the calls they feed
    assert store.run_flows("other") == [flows[2]]  # a flow from another run's call counts
    assert store.run_flows("nothing") == []


def test_calls_usage_groups_by_model_kind_run_and_bucket(store: Store) -> None:
    day = 86_400.0
    model = {"kind": "chat_model", "model": "m-1", "node_id": "a" * 64}
    store.write(calls=[
        call("u0", 0, started_at=day * 10 + 5, tokens_in=10, tokens_out=2, duration_s=1.5, **model),
        call("u1", 1, started_at=day * 10 + 9, tokens_in=10, tokens_out=2, replayed=1,
             saved_s=1.5, duration_s=0.001, **model),
        call("u2", 0, run_id="r2", started_at=day * 11 + 1, tokens_in=4, tokens_out=1,
             replayed=1, saved_s=0.5, duration_s=0.002, **model),
        call("u3", 2, started_at=day * 10 + 7, kind="step", node_id="b" * 64, replayed=1,
             saved_s=2.0, duration_s=0.003),
        call("u4", 3, started_at=day * 10 + 8),  # a chain: no node, no tokens: not counted
    ])

    def key(row: Any) -> tuple[Any, ...]:
        return (row.run_id, row.bucket_start, row.model, row.kind, row.replayed)

    every = {key(r): r for r in store.call_usage()}
    assert set(every) == {
        (None, None, "m-1", "chat_model", 0), (None, None, "m-1", "chat_model", 1),
        (None, None, None, "step", 1),
    }
    replayed = every[(None, None, "m-1", "chat_model", 1)]
    assert (replayed.calls, replayed.tokens_in, replayed.tokens_out) == (2, 14, 3)
    assert replayed.saved_s == pytest.approx(2.0)
    assert every[(None, None, "m-1", "chat_model", 0)].duration_s == pytest.approx(1.5)
    by_day = {key(r): r.calls for r in store.call_usage(bucket_s=day)}
    assert by_day == {
        (None, day * 10, "m-1", "chat_model", 0): 1, (None, day * 10, "m-1", "chat_model", 1): 1,
        (None, day * 11, "m-1", "chat_model", 1): 1, (None, day * 10, None, "step", 1): 1,
    }
    by_run = {key(r): r.tokens_in for r in store.call_usage(run_ids=["r2", "nothing"])}
    assert by_run == {("r2", None, "m-1", "chat_model", 1): 4}
    assert {key(r) for r in store.call_usage(since=day * 11)} == {
        (None, None, "m-1", "chat_model", 1)
    }
    assert store.call_usage(run_ids=[]) == []


def test_store_invalidation_set_is_exactly_what_invalidate_marks(store: Store) -> None:
    """The read-only preview lists exactly the nodes invalidate() then marks, and writes
    nothing: a diamond (each node once), a cycle, contains edges not followed."""
    from .conformance import build_graph, status_of

    ids = build_graph(
        store,
        [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d"), ("d", "e"), ("e", "b"), ("y", "x")],
        ["a", "b", "c", "d", "e", "x", "y"],
    )
    store.write((), (), [EdgeWrite(ids["b"], ids["x"], "contains")])
    before = {n: status_of(store, i) for n, i in ids.items()}
    preview = store.invalidation_set(ids["b"])
    assert len(preview) == len({r.node_id for r in preview})
    assert {r.node_id for r in preview} == {ids["b"], ids["d"], ids["e"]}
    assert {n: status_of(store, i) for n, i in ids.items()} == before  # nothing written
    store.invalidate(ids["b"])
    marked = {i for i in ids.values() if status_of(store, i) == "stale"}
    assert marked == {r.node_id for r in preview}
    assert {r.node_id for r in store.invalidation_set(ids["a"])} == {
        ids[n] for n in "abcde"
    }
    assert store.invalidation_set("0" * 64) == []
