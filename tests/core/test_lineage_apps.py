"""Lineage as a user checks it, on plain-Python apps: an ``@step`` fan-in pipeline and a durable
run whose steps feed each other. Every run is a tree of calls; an old answer still points at the
inputs that produced it; a run's lineage never reaches another run's calls."""

from __future__ import annotations

from pathlib import Path

from musubi_core import Engine, Result, SQLiteStore, merge, run, step, use_engine
from musubi_core.record import trace
from tests.support import lineage

executed: list[str] = []


@step(version="1")
def load(name: str, text: str) -> str:
    executed.append(f"load:{name}")
    return text


@step(version="1")
def facts(doc: Result[str]) -> list[str]:
    executed.append("facts")
    return [s.strip() for s in doc.value.split(".") if s.strip()]


@step(version="1")
def answer(question: str) -> str:
    executed.append("answer")
    return question + " -> " + "; ".join(sorted({"answered"}))


def _pipeline(docs: dict[str, str]) -> Result[str]:
    """Fan-in: one facts() per document, then one answer() over all of them (merge)."""
    found = [facts(load(name, text)) for name, text in sorted(docs.items())]
    with merge(*found):
        return answer("what do we know?")


def test_step_fan_in_pipeline_lineage(tmp_path: Path) -> None:
    db = str(tmp_path / "m.db")
    docs = {"a": "Alpha is first. Alpha is old.", "b": "Beta is second."}
    executed.clear()
    with Engine(SQLiteStore(db)) as engine, use_engine(engine):
        with trace("pass 1"):
            old = _pipeline(docs)
        with trace("pass 2"):
            same = _pipeline(docs)
        assert same.replayed and same.value == old.value
        assert executed.count("answer") == 1 and executed.count("facts") == 2
        docs["a"] = "Alpha was rewritten. Alpha is new."
        with trace("pass 3"):
            new = _pipeline(docs)
    # Only the edited document's steps and the fan-in re-ran.
    assert executed.count("load:a") == 2 and executed.count("load:b") == 1
    assert executed.count("answer") == 2 and not new.replayed
    lineage.assert_runs_are_trees(db)
    run1, run2, run3 = lineage.runs(db)
    assert [r["name"] for r in (run1, run2, run3)] == ["pass 1", "pass 2", "pass 3"]
    assert (run1["calls"], run2["calls"], run3["calls"]) == (5, 5, 5)
    assert (run2["replays"], run3["replays"]) == (5, 2)  # load b and facts b replayed
    assert old.call_id and new.call_id and same.call_id
    old_flow = lineage.what_flowed(db, old.call_id)
    new_flow = lineage.what_flowed(db, new.call_id)
    assert "Alpha is old" in old_flow and "rewritten" not in old_flow
    assert "rewritten" in new_flow and "Alpha is old" not in new_flow
    assert "Beta is second" in old_flow and "Beta is second" in new_flow
    for result, r in ((old, run1), (same, run2), (new, run3)):
        ups = lineage.upstream(db, result.call_id or "")
        assert len(ups) == 4 and {c["run_id"] for c in ups} == {r["run_id"]}


def test_durable_run_steps_feed_each_other(tmp_path: Path) -> None:
    db = str(tmp_path / "task.db")

    def workflow(source: str) -> object:
        def body(ctx: object) -> int:
            text = ctx.step("fetch", lambda: source)  # type: ignore[attr-defined]
            words = ctx.step("split", lambda: text.split())  # type: ignore[attr-defined]
            return ctx.step("count", lambda: len(words))  # type: ignore[attr-defined]

        return body

    assert run(db, workflow("one two three"), run_id="old") == 3
    assert run(db, workflow("four five"), run_id="new") == 2
    lineage.assert_runs_are_trees(db)
    for run_id, seen, unseen in (("old", "one two three", "four"), ("new", "four five", "one")):
        calls = lineage.calls(db, run_id)
        assert [c["op_name"] for c in calls] == ["fetch", "split", "count"]
        ups = lineage.upstream(db, calls[-1]["call_id"])
        assert [c["op_name"] for c in ups] == ["fetch", "split"]
        assert {c["run_id"] for c in ups} == {run_id}
        flowed = lineage.what_flowed(db, calls[-1]["call_id"])
        assert seen in flowed and unseen not in flowed
    (old,) = [r for r in lineage.runs(db) if r["run_id"] == "old"]
    assert old["kind"] == "durable" and old["calls"] == 3 and old["status"] == "done"
