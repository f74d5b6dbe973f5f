"""``musubi runs``, ``musubi steps RUN``, ``musubi nodes`` and ``musubi stats`` on a store made
by real ``@step`` traces, a loose ``@step`` call, a failed trace and a durable run."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from _cli_support import build_store, musubi, musubi_json

WHEN = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_store(tmp_path_factory.mktemp("runs"))


@pytest.fixture
def scratch(store: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """A copy of the store that a test may change."""
    db = tmp_path / "copy.db"
    with sqlite3.connect(store["db"]) as src, sqlite3.connect(db) as dst:
        src.backup(dst)
    return {**store, "db": db}


def by_id(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["run_id"]: r for r in runs}


def test_runs_lists_every_kind_newest_first_with_counts(store: dict[str, Any]) -> None:
    db, run1, run2 = store["db"], store["run1"]["run_id"], store["run2"]["run_id"]
    runs = musubi_json(db, "runs")
    assert sorted(r["kind"] for r in runs) == ["durable"] + ["script"] * 4 + ["step"] * 2
    assert runs[0]["run_id"] == "nightly-1"  # the newest
    started = [r["started_at"] for r in runs]
    assert started == sorted(started, reverse=True)
    found = by_id(runs)
    # pipeline, config, retrieve, prompt, fmt, answer and the retriever call.
    assert (found[run1]["calls"], found[run1]["replays"]) == (7, 0)
    assert (found[run2]["calls"], found[run2]["replays"]) == (7, 1)  # config replayed
    assert found[run2]["name"] == "rag" and found[run2]["status"] == "done"
    assert found[run2]["seconds_saved"] > 0
    durable = found["nightly-1"]
    assert (durable["steps_done"], durable["steps_total"], durable["calls"]) == (3, 3, 3)
    failed = [r for r in runs if r["name"] == "broken"]
    assert {r["status"] for r in failed} == {"failed"} and "the broken run" in failed[0]["error"]

    text = musubi(db, "runs").stdout
    header, _rule, *rows = text.splitlines()
    assert header.split()[:6] == ["RUN", "KIND", "NAME", "STATUS", "STARTED", "TOOK"]
    assert "TOKENS SAVED" in header and "TIME SAVED" in header and "STEPS" in header
    assert rows[0].startswith("nightly-1") and " 3/3 " in rows[0]
    assert len(rows) == 7 and all(WHEN.search(row) for row in rows)
    rag2 = next(row for row in rows if row.startswith(run2))
    assert rag2.split()[1:4] == ["script", "rag", "done"]


def test_runs_filters(scratch: dict[str, Any]) -> None:
    db, run1, run2 = scratch["db"], scratch["run1"]["run_id"], scratch["run2"]["run_id"]
    assert [r["run_id"] for r in musubi_json(db, "runs", "--kind", "durable")] == ["nightly-1"]
    failed = musubi_json(db, "runs", "--status", "failed")
    assert [r["name"] for r in failed] == ["broken", "broken"]
    done = musubi_json(db, "runs", "--kind", "script", "--status", "done")
    assert {r["run_id"] for r in done} == {run1, run2}
    assert [r["run_id"] for r in musubi_json(db, "runs", "--limit", "1")] == ["nightly-1"]
    assert musubi_json(db, "runs", "--status", "running") == []

    with sqlite3.connect(db) as conn:  # run 1 started two hours ago
        conn.execute(
            "UPDATE musubi_runs SET started_at = started_at - 7200 WHERE run_id = ?", (run1,)
        )
    recent = {r["run_id"] for r in musubi_json(db, "runs", "--since", "1h")}
    assert run2 in recent and run1 not in recent and len(recent) == 6
    assert run1 in {r["run_id"] for r in musubi_json(db, "runs", "--since", "3h")}
    assert run1 not in {r["run_id"] for r in musubi_json(db, "runs", "--since", "90m")}

    bad = musubi(db, "runs", "--since", "soon")
    assert bad.returncode == 2 and "invalid duration" in bad.stderr
    assert musubi(db, "runs", "--kind", "nothing").stdout.startswith("no runs match")


def test_steps_shows_the_call_tree_in_order(store: dict[str, Any]) -> None:
    db, run2 = store["db"], store["run2"]
    data = musubi_json(db, "steps", run2["run_id"][:6])  # a unique prefix is enough
    assert data["run"]["run_id"] == run2["run_id"] and "steps" not in data
    calls = data["calls"]
    assert [c["seq"] for c in calls] == list(range(7))
    assert [c["op_name"] for c in calls] == [
        "rag.pipeline", "rag.config", "rag.retrieve", "rag.prompt", "rag.fmt", "rag.answer",
        "VectorRetriever"]
    ids = {c["op_name"]: c["call_id"] for c in calls}
    parents = {c["op_name"]: c["parent_call_id"] for c in calls}
    assert parents["rag.pipeline"] is None
    assert {parents[o] for o in ("rag.config", "rag.retrieve", "rag.prompt", "rag.answer",
                                 "VectorRetriever")} == {ids["rag.pipeline"]}
    assert parents["rag.fmt"] == ids["rag.prompt"]
    assert [c["replayed"] for c in calls if c["op_name"] == "rag.config"] == [True]
    assert {c["kind"] for c in calls} == {"step", "retriever"}
    assert ids["rag.answer"] == run2["answer_call"]

    text = musubi(db, "steps", run2["run_id"]).stdout
    lines = text.splitlines()
    assert lines[0].startswith(f"run {run2['run_id']} (script rag): done")
    header = lines[1].split()
    assert header[:7] == ["#", "CALL", "PARENT", "KIND", "OP", "NODE", "REPLAYED"]
    rows = lines[3:]

    def row(op: str) -> str:
        return next(r for r in rows if re.search(rf"\s{re.escape(op)}\s", r))

    def indent(op: str) -> int:
        line = row(op)
        return line.index(op) - line.index(" step ") if " step " in line else -1

    # Tree order: prompt's child fmt right after prompt; indentation by depth.
    order = [next(i for i, r in enumerate(rows) if f" {op} " in r) for op in
             ("rag.pipeline", "rag.config", "rag.retrieve", "rag.prompt", "rag.fmt",
              "rag.answer")]
    assert order == sorted(order)
    assert indent("rag.pipeline") < indent("rag.config") == indent("rag.prompt") < indent("rag.fmt")
    assert row("rag.config").split()[1] == ids["rag.config"] and " yes " in row("rag.config")
    assert " #0 " in row("rag.answer") and " #0 " not in row("rag.pipeline")
    assert "retriever" in row("VectorRetriever")


def test_steps_of_a_durable_run(store: dict[str, Any]) -> None:
    data = musubi_json(store["db"], "steps", "nightly-1")
    assert [(s["name"], s["kind"], s["status"], s["attempts"]) for s in data["steps"]] == [
        ("fetch", "step", "done", 1), ("pause", "sleep", "done", 1), ("total", "step", "done", 1)]
    assert [(c["kind"], c["op_name"]) for c in data["calls"]] == [
        ("run_step", "fetch"), ("sleep", "pause"), ("run_step", "total")]
    text = musubi(store["db"], "steps", "nightly").stdout
    assert "3/3 steps done, attempt 1" in text and "ATTEMPTS" in text
    assert re.search(r"run_step\s+total\s", text)


def test_nodes_filters(scratch: dict[str, Any]) -> None:
    db, run1, run2 = scratch["db"], scratch["run1"], scratch["run2"]
    everything = musubi_json(db, "nodes", "--limit", "500")
    assert {n["kind"] for n in everything} == {"step", "run_step", "run"}
    created = [n["created_at"] for n in everything]
    assert created == sorted(created, reverse=True)
    steps = musubi_json(db, "nodes", "--kind", "run_step")
    assert sorted(n["op_name"] for n in steps) == [
        "run:nightly-1:fetch", "run:nightly-1:pause", "run:nightly-1:total"]
    retrieved = musubi_json(db, "nodes", "--op", "rag.re")
    assert [n["op_name"] for n in retrieved] == ["rag.retrieve", "rag.retrieve"]

    def calls_nodes(run: str) -> set[str]:
        calls = musubi_json(db, "steps", run)["calls"]
        return {c["node_id"] for c in calls if c["node_id"]}

    of_run2 = {n["node_id"] for n in musubi_json(db, "nodes", "--run", run2["run_id"][:8])}
    assert of_run2 == calls_nodes(run2["run_id"]) and len(of_run2) == 6
    of_run1 = {n["node_id"] for n in musubi_json(db, "nodes", "--run", run1["run_id"])}
    assert len(of_run1 & of_run2) == 1  # the config node, replayed by run 2

    retrieve_v1 = next(n for n in retrieved if n["node_id"] in of_run1)["node_id"]
    assert musubi(db, "invalidate", retrieve_v1).returncode == 0
    stale = {n["op_name"] for n in musubi_json(db, "nodes", "--status", "stale")}
    assert stale == {"rag.retrieve", "rag.fmt", "rag.prompt", "rag.answer"}
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE musubi_nodes SET created_at = created_at - 86400 * 3")
        conn.execute("UPDATE musubi_nodes SET created_at = created_at + 86400 * 3 "
                     "WHERE kind = 'run_step'")
    assert {n["kind"] for n in musubi_json(db, "nodes", "--since", "1d")} == {"run_step"}

    text = musubi(db, "nodes", "--kind", "step", "--op", "rag.answer").stdout
    assert text.splitlines()[0].split()[:4] == ["NODE", "KIND", "OP", "STATUS"]
    assert len(text.splitlines()) == 4 and all(WHEN.search(line) for line in text.splitlines()[2:])


def test_stats_counts_runs_and_calls(store: dict[str, Any]) -> None:
    stats = musubi_json(store["db"], "stats")
    by_kind = stats["runs_by_kind"]
    assert {k: v["runs"] for k, v in by_kind.items()} == {"durable": 1, "script": 4, "step": 2}
    assert by_kind["script"]["calls"] == 14 and by_kind["script"]["replays"] == 1
    assert stats["calls"] == 14 + 3 + 2 and stats["runs"] == 7
    text = musubi(store["db"], "stats").stdout
    assert re.search(r"^script\s+4\s+14\s+1\s", text, re.MULTILINE)


def test_steps_of_a_durable_run_recorded_before_calls(tmp_path: Path) -> None:
    """A durable run of a schema-1 store has steps but no calls: ``steps`` still lists them."""
    db = tmp_path / "v1.db"
    with sqlite3.connect(Path(__file__).parents[1] / "data" / "v1_store.db") as src, \
            sqlite3.connect(db) as dst:
        src.backup(dst)
    (run,) = musubi_json(db, "runs")
    assert (run["run_id"], run["kind"], run["steps_done"]) == ("v1-run", "durable", 3)
    data = musubi_json(db, "steps", "v1-run")
    assert data["calls"] == [] and [s["name"] for s in data["steps"]] == ["load", "split", "count"]
    text = musubi(db, "steps", "v1").stdout
    assert [line.split()[3:5] for line in text.splitlines()[3:]] == [
        ["run_step", "load"], ["run_step", "split"], ["run_step", "count"]]
