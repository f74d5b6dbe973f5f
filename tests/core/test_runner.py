"""Durable runs: the predecessor runner's own scenarios (happy path, resume,
names, duplicates, a lock held by another process, sleep, failures, async,
schema, serialization), and what musubi adds (divergence, lineage, run ids)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from _runner_support import committed, kill, spawn, wait_for

import musubi_core
from musubi_core import (
    Context,
    DivergenceError,
    DuplicateStepError,
    InvalidStepNameError,
    LockedError,
    SchemaError,
    SerializationError,
    StepFailedError,
    arun,
    run,
)
from musubi_core import runner as runner_module

# The suite runs on SQLite and on PostgreSQL (tests/conftest.py): ``db_path`` is a file or a
# database URL.
BOTH_BACKENDS = True


def on_postgres(db: Path | str) -> bool:
    return str(db).startswith("postgresql://")


def rows(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    if on_postgres(db):
        import psycopg

        with psycopg.connect(str(db)) as pg:
            pg.execute("SET search_path TO musubi")
            return pg.execute(sql.replace("?", "%s"), params).fetchall()
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def steps(db: Path, run_id: str = "default") -> list[tuple[str, str, str, int]]:
    return [
        (r[0], r[1], r[2], r[3])
        for r in rows(db, "SELECT name, kind, status, attempts FROM musubi_run_steps "
                          "WHERE run_id = ? ORDER BY seq", run_id)
    ]


# -- happy path and resume --------------------------------------------------------------


def test_steps_run_once_and_replay(db_path: Path) -> None:
    calls: list[str] = []

    def one() -> int:
        calls.append("a")
        return 1

    def wf(ctx: Context) -> dict[str, int]:
        a = ctx.step("a", one)
        return ctx.step("b", lambda: (calls.append("b"), {"v": a + 1})[1])

    assert run(db_path, wf) == {"v": 2}
    assert run(db_path, wf) == {"v": 2}
    assert calls == ["a", "b"]
    assert steps(db_path) == [("a", "step", "done", 1), ("b", "step", "done", 1)]
    status, attempts = rows(db_path, "SELECT status, attempts FROM musubi_runs")[0]
    assert (status, attempts) == ("done", 2)


def test_resume_after_the_body_raised(db_path: Path) -> None:
    calls: list[str] = []

    def fetch() -> int:
        calls.append("a")
        return 42

    def first(ctx: Context) -> None:
        ctx.step("a", fetch)
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        run(db_path, first)
    assert rows(db_path, "SELECT status, error FROM musubi_runs")[0][0] == "failed"

    def second(ctx: Context) -> int:
        v = ctx.step("a", fetch)
        return ctx.step("b", lambda: (calls.append("b"), v + 1)[1])

    assert run(db_path, second) == 43
    assert calls == ["a", "b"]


def test_values_keep_their_types_on_first_run_and_replay(db_path: Path) -> None:
    value = {"t": (1, 2), "b": b"\x00x", "when": dt.datetime(2024, 6, 1, 12, 0), "s": {3}}

    def wf(ctx: Context) -> Any:
        return ctx.step("a", lambda: value)

    first = run(db_path, wf)
    again = run(db_path, wf)
    assert first == again == value
    assert type(first["t"]) is tuple and type(again["b"]) is bytes
    assert first is not value  # the body gets the stored copy, both times


def test_run_ids_share_one_store(db_path: Path) -> None:
    def wf(ctx: Context) -> str:
        return ctx.step("who", lambda: ctx.run_id)

    assert run(db_path, wf, run_id="job-1") == "job-1"
    assert run(db_path, wf, run_id="job-2") == "job-2"
    assert run(db_path, wf, run_id="job-1") == "job-1"
    assert sorted(r[0] for r in rows(db_path, "SELECT run_id FROM musubi_runs")) == [
        "job-1", "job-2"]


# -- names ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["bad name", "", ".hidden", "-x", "a/b", "a\n", "é", 3, None])
def test_invalid_names_are_rejected_before_any_write(db_path: Path, bad: Any) -> None:
    def wf(ctx: Context) -> None:
        ctx.step("ok", lambda: 1)
        ctx.step(bad, lambda: 2)

    with pytest.raises(InvalidStepNameError) as info:
        run(db_path, wf)
    assert isinstance(info.value, ValueError)
    assert [s[0] for s in steps(db_path)] == ["ok"]

    with pytest.raises(InvalidStepNameError):
        run(db_path, lambda ctx: ctx.sleep(bad, "1ms"))
    assert [s[0] for s in steps(db_path)] == ["ok"]


def test_invalid_run_id_and_rerun_from_touch_no_file(tmp_path: Path) -> None:
    db = tmp_path / "never.db"
    with pytest.raises(ValueError):
        run(db, lambda ctx: None, run_id="no spaces")
    with pytest.raises(InvalidStepNameError):
        run(db, lambda ctx: None, rerun_from="no spaces")
    assert os.listdir(tmp_path) == []


def test_duplicate_names_raise(db_path: Path) -> None:
    def wf(ctx: Context) -> None:
        ctx.step("x", lambda: 1)
        ctx.step("x", lambda: 2)

    with pytest.raises(DuplicateStepError) as info:
        run(db_path, wf)
    assert info.value.name == "x"
    assert steps(db_path) == [("x", "step", "done", 1)]

    with pytest.raises(DuplicateStepError):
        run(db_path, lambda ctx: (ctx.sleep("y", 0), ctx.step("y", lambda: 1)))


# -- one writer per run -----------------------------------------------------------------


def test_a_second_process_gets_locked_error(tmp_path: Path) -> None:
    db, side, hold = tmp_path / "task.db", tmp_path / "side.txt", tmp_path / "hold"
    hold.write_text("")
    proc = spawn(db, side, 2, CHILD_HOLD=str(hold))
    try:
        assert wait_for(side, proc.pid, "start", "s0000", proc=proc)
        with pytest.raises(LockedError) as info:
            run(db, lambda ctx: ctx.step("s0000", lambda: "stolen"))
        assert info.value.run_id == "default"
        # Another run in the same store is not blocked, and readers are fine.
        assert run(db, lambda ctx: ctx.step("a", lambda: 1), run_id="other") == 1
        assert rows(db, "PRAGMA integrity_check") == [("ok",)]
        hold.unlink()
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        kill(proc)
    assert "stolen" not in out


def test_the_lock_dies_with_its_holder(tmp_path: Path) -> None:
    db, side, hold = tmp_path / "task.db", tmp_path / "side.txt", tmp_path / "hold"
    hold.write_text("")
    proc = spawn(db, side, 2, CHILD_HOLD=str(hold))
    assert wait_for(side, proc.pid, "start", "s0000", proc=proc)
    assert kill(proc)
    # No stale lock: the next invocation proceeds at once and re-runs s0000.
    assert run(db, lambda ctx: ctx.step("s0000", lambda: "mine")) == "mine"


def test_same_process_second_writer_is_locked_out(db_path: Path) -> None:
    def inner(ctx: Context) -> None:
        run(db_path, lambda c: None)

    with pytest.raises(LockedError):
        run(db_path, inner)


# -- sleep ------------------------------------------------------------------------------


def test_sleep_persists_its_wake_time(db_path: Path) -> None:
    t0 = time.monotonic()
    run(db_path, lambda ctx: ctx.sleep("nap", "50ms"))
    assert time.monotonic() - t0 >= 0.05
    (wake_at,) = rows(db_path, "SELECT wake_at FROM musubi_run_steps WHERE name = 'nap'")[0]
    t0 = time.monotonic()
    run(db_path, lambda ctx: ctx.sleep("nap", "10s"))  # recorded: nothing left to sleep
    assert time.monotonic() - t0 < 0.5
    assert rows(db_path, "SELECT wake_at FROM musubi_run_steps")[0][0] == wake_at


def test_a_killed_sleep_resumes_for_the_remainder(tmp_path: Path) -> None:
    db, side = tmp_path / "task.db", tmp_path / "side.txt"
    proc = spawn(db, side, 12, CHILD_SLEEP="2s", CHILD_STEP_DELAY="0")
    assert wait_for(side, proc.pid, "sleep-begin", proc=proc)
    time.sleep(0.6)
    assert kill(proc)
    (wake_at,) = rows(db, "SELECT wake_at FROM musubi_run_steps WHERE name = 'nap'")[0]
    left = wake_at - time.time()
    assert 0.5 < left < 1.5

    def wf(ctx: Context) -> None:
        ctx.sleep("nap", "2s")

    t0 = time.monotonic()
    run(db, wf)
    slept = time.monotonic() - t0
    assert left - 0.1 <= slept <= left + 0.3


@pytest.mark.parametrize("duration", ["30ms", 0.03, dt.timedelta(milliseconds=30), "0.03s"])
def test_duration_forms(db_path: Path, duration: Any) -> None:
    t0 = time.monotonic()
    run(db_path, lambda ctx: ctx.sleep("nap", duration))
    assert 0.03 <= time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("bad", ["soon", "-5s", -1, float("nan"), True, [1]])
def test_bad_durations_are_rejected_before_any_write(db_path: Path, bad: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        run(db_path, lambda ctx: ctx.sleep("nap", bad))
    assert steps(db_path) == []


def test_a_clock_set_back_cannot_stretch_a_sleep(db_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    run(db_path, lambda ctx: ctx.sleep("nap", "100ms"))

    class Behind:
        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

        def time(self) -> float:
            return time.time() - 3  # a broken cap would sleep ~3 s

    monkeypatch.setattr(runner_module, "time", Behind())
    t0 = time.monotonic()
    run(db_path, lambda ctx: ctx.sleep("nap", "100ms"))
    assert time.monotonic() - t0 < 0.5


# -- failures ---------------------------------------------------------------------------


def test_a_failed_step_is_recorded_and_runs_again(db_path: Path) -> None:
    boom = RuntimeError("boom")

    def fails() -> int:
        raise boom

    with pytest.raises(StepFailedError) as info:
        run(db_path, lambda ctx: ctx.step("s", fails))
    assert info.value.original is boom and info.value.__cause__ is boom
    assert steps(db_path) == [("s", "step", "failed", 1)]
    assert "boom" in rows(db_path, "SELECT error FROM musubi_run_steps")[0][0]

    calls: list[str] = []
    assert run(db_path, lambda ctx: ctx.step("s", lambda: (calls.append("s"), 7)[1])) == 7
    assert calls == ["s"]
    assert steps(db_path) == [("s", "step", "done", 2)]


def test_a_failed_step_can_be_retried_in_the_same_body(db_path: Path) -> None:
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("try again")
        return "ok"

    def wf(ctx: Context) -> str:
        for _ in range(5):
            try:
                return ctx.step("call", flaky)
            except StepFailedError:
                continue
        raise AssertionError("unreachable")

    assert run(db_path, wf) == "ok"
    assert steps(db_path) == [("call", "step", "done", 3)]


def test_a_step_in_flight_is_visible_to_readers(db_path: Path) -> None:
    seen: list[tuple[Any, ...]] = []

    def observe() -> int:
        seen.extend(rows(db_path, "SELECT name, status FROM musubi_run_steps"))
        return 1

    run(db_path, lambda ctx: ctx.step("s", observe))
    assert seen == [("s", "pending")]


# -- async ------------------------------------------------------------------------------


def test_arun_astep_asleep(db_path: Path) -> None:
    calls: list[str] = []

    async def value(tag: str, v: int) -> int:
        calls.append(tag)
        await asyncio.sleep(0)
        return v

    async def wf(ctx: Context) -> int:
        a = await ctx.astep("a", lambda: value("a", 1))
        await ctx.asleep("nap", "10ms")
        both = await asyncio.gather(ctx.astep("b", lambda: value("b", a + 1)),
                                    ctx.astep("c", lambda: value("c", 10)))
        sync = await ctx.astep("d", lambda: 5)  # a plain value is fine too
        return sum(both) + sync

    assert asyncio.run(arun(db_path, wf)) == 17
    assert sorted(calls) == ["a", "b", "c"]
    calls.clear()
    assert asyncio.run(arun(db_path, wf)) == 17
    assert calls == []


def test_async_failure_wraps(db_path: Path) -> None:
    async def fails() -> None:
        raise KeyError("k")

    async def wf(ctx: Context) -> None:
        await ctx.astep("a", fails)

    with pytest.raises(StepFailedError) as info:
        asyncio.run(arun(db_path, wf))
    assert isinstance(info.value.original, KeyError)


# -- schema and serialization -----------------------------------------------------------


def test_a_newer_schema_is_refused(db_path: Path) -> None:
    if on_postgres(db_path):
        pytest.skip("SQLite file specific (the PostgreSQL store's schema checks: tests/postgres)")
    run(db_path, lambda ctx: ctx.step("a", lambda: 1))
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE musubi_meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaError):
        run(db_path, lambda ctx: ctx.step("a", lambda: 1))


def test_a_foreign_database_is_refused_and_left_alone(db_path: Path) -> None:
    if on_postgres(db_path):
        pytest.skip("SQLite file specific (the PostgreSQL store's schema checks: tests/postgres)")
    conn = sqlite3.connect(db_path)
    conn.execute("CREATE TABLE mundane_steps (id INTEGER PRIMARY KEY, name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaError):
        run(db_path, lambda ctx: ctx.step("a", lambda: 1))
    names = {r[0] for r in rows(db_path, "SELECT name FROM sqlite_master")}
    assert names == {"mundane_steps"}


def test_unstorable_results_raise_with_path_and_value(db_path: Path) -> None:
    thing = object()
    value = {"items": [1, thing]}
    with pytest.raises(SerializationError) as info:
        run(db_path, lambda ctx: ctx.step("a", lambda: value))
    assert info.value.value is value
    assert info.value.path == "$.items[1]"
    assert "'a'" in str(info.value)
    assert steps(db_path) == [("a", "step", "failed", 1)]
    # Fixed code runs the step again (and that is a change of code, not divergence).
    assert run(db_path, lambda ctx: ctx.step("a", lambda: [1, 2])) == [1, 2]


def test_nan_is_refused(db_path: Path) -> None:
    with pytest.raises(SerializationError):
        run(db_path, lambda ctx: ctx.step("a", lambda: float("nan")))


# -- divergence -------------------------------------------------------------------------


def _first(ctx: Context) -> list[int]:
    a = ctx.step("a", lambda: 1)
    b = ctx.step("b", lambda: a + 1)
    c = ctx.step("c", lambda: b + 1)
    return [a, b, c]


def _changed(ctx: Context) -> list[int]:
    a = ctx.step("a", lambda: 1)
    b = ctx.step("b", lambda: a + 100)
    c = ctx.step("c", lambda: b + 1)
    return [a, b, c]


def test_changed_code_is_loud(db_path: Path) -> None:
    assert run(db_path, _first) == [1, 2, 3]
    with pytest.raises(DivergenceError) as info:
        run(db_path, _changed)
    assert (info.value.name, info.value.what) == ("b", "code")
    assert "rerun_from='b'" in str(info.value)
    # Accepting the change re-runs b and everything after it; a is replayed.
    assert run(db_path, _changed, rerun_from="b") == [1, 101, 102]
    assert [s[3] for s in steps(db_path)] == [1, 1, 1]
    assert run(db_path, _changed) == [1, 101, 102]


def test_changed_kind_is_loud(db_path: Path) -> None:
    run(db_path, lambda ctx: ctx.sleep("x", 0))
    with pytest.raises(DivergenceError) as info:
        run(db_path, lambda ctx: ctx.step("x", lambda: 1))
    assert (info.value.what, info.value.recorded, info.value.expected) == ("kind", "sleep", "step")
    assert run(db_path, lambda ctx: ctx.step("x", lambda: 1), rerun_from="x") == 1


def test_unchanged_code_in_a_new_closure_is_not_divergence(db_path: Path) -> None:
    def one(ctx: Context) -> int:
        first = ctx.step("a", lambda: 41)
        return first

    def two(ctx: Context) -> int:
        renamed = ctx.step("a", lambda: 41)  # same lambda, other surroundings
        return renamed

    assert run(db_path, one) == 41
    assert run(db_path, two) == 41


def test_rerun_from_an_unknown_step(db_path: Path) -> None:
    run(db_path, _first)
    with pytest.raises(ValueError, match="no step"):
        run(db_path, _first, rerun_from="zzz")


# -- lineage ----------------------------------------------------------------------------


def test_steps_are_lineage_nodes_under_the_run(db_path: Path) -> None:
    @musubi_core.step
    def inner(x: int) -> int:
        return x * 2

    def wf(ctx: Context) -> int:
        return ctx.step("outer", lambda: inner(21).value)

    assert run(db_path, wf, run_id="r1") == 42
    (run_node,) = rows(db_path, "SELECT node_id FROM musubi_runs WHERE run_id = 'r1'")[0]
    (step_node,) = rows(db_path, "SELECT node_id FROM musubi_run_steps WHERE name = 'outer'")[0]
    kinds = dict(rows(db_path, "SELECT node_id, kind FROM musubi_nodes"))
    assert kinds[run_node] == "run" and kinds[step_node] == "run_step"
    edges = set(rows(db_path, "SELECT parent, child FROM musubi_edges WHERE kind = 'contains'"))
    assert (run_node, step_node) in edges
    # The @step called inside the durable step is a call of the run, under the step's call.
    calls = rows(
        db_path,
        "SELECT call_id, parent_call_id, kind, op_name, node_id FROM musubi_calls "
        "WHERE run_id = 'r1' ORDER BY seq",
    )
    assert [(c[2], c[3].rsplit(".", 1)[-1]) for c in calls] == [("run_step", "outer"), ("step", "inner")]
    assert calls[0][1] is None and calls[1][1] == calls[0][0]
    assert calls[0][4] == step_node and kinds[calls[1][4]] == "step"
    assert committed(db_path, "r1") == {"outer"}


def test_durable_steps_carry_data_lineage(db_path: Path) -> None:
    """A step whose function consumes an earlier step's result gets a data edge from it (call
    flows and node edges); a resumed run's replays are calls of the same run."""

    def wf(ctx: Context) -> int:
        text = ctx.step("load", lambda: "alpha beta gamma")
        words = ctx.step("split", lambda: text.split())
        return ctx.step("count", lambda: len(words))

    assert run(db_path, wf, run_id="lin") == 3
    calls = rows(
        db_path, "SELECT op_name, call_id, replayed, node_id FROM musubi_calls "
        "WHERE run_id = 'lin' ORDER BY seq",
    )
    assert [(c[0], c[2]) for c in calls] == [("load", 0), ("split", 0), ("count", 0)]
    ids = {c[0]: c[1] for c in calls}
    nodes = {c[0]: c[3] for c in calls}
    flows = set(rows(db_path, "SELECT src_call_id, dst_call_id FROM musubi_flows"))
    assert flows == {(ids["load"], ids["split"]), (ids["split"], ids["count"])}
    data = set(rows(db_path, "SELECT parent, child FROM musubi_edges WHERE kind = 'data'"))
    assert data == {(nodes["load"], nodes["split"]), (nodes["split"], nodes["count"])}
    (totals,) = rows(db_path, "SELECT calls, replays FROM musubi_runs WHERE run_id = 'lin'")
    assert totals == (3, 0)
    # Resumed (here: run again after it finished): three replays, appended in order.
    assert run(db_path, wf, run_id="lin") == 3
    again = rows(
        db_path, "SELECT op_name, replayed, seq FROM musubi_calls WHERE run_id = 'lin' "
        "ORDER BY seq",
    )
    assert [(c[0], c[1]) for c in again[3:]] == [("load", 1), ("split", 1), ("count", 1)]
    assert [c[2] for c in again] == list(range(6))
    (totals,) = rows(db_path, "SELECT calls, replays FROM musubi_runs WHERE run_id = 'lin'")
    assert totals == (6, 3)


def test_durable_checkpoints_use_synchronous_full(db_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    if on_postgres(db_path):
        pytest.skip("SQLite file specific (the PostgreSQL store's schema checks: tests/postgres)")
    from musubi_core.store import SQLiteStore

    seen: list[str] = []
    original = SQLiteStore.commit_durable

    def spy(self: SQLiteStore, fn: Any, action: str = "durable commit") -> Any:
        def wrapped(conn: sqlite3.Connection) -> Any:
            seen.append(f"{action}:{conn.execute('PRAGMA synchronous').fetchone()[0]}")
            return fn(conn)

        return original(self, wrapped, action)

    monkeypatch.setattr(SQLiteStore, "commit_durable", spy)
    run(db_path, lambda ctx: (ctx.step("a", lambda: 1), ctx.sleep("n", 0)))
    assert seen == ["checkpoint step 'a':2", "checkpoint step 'n':2"]  # 2 == FULL
