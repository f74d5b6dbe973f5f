"""The ``musubi`` command, run as a real subprocess against real store files."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.storedb import REPLAYS

ROOT = Path(__file__).resolve().parents[2]

PIPELINE = textwrap.dedent(
    """
    import sys
    from musubi_core import Engine, SQLiteStore, StepConfiguration, StepType, step, use_engine

    log = open(sys.argv[2], "a")

    @step(name="cli.extract")
    def extract(text: str) -> list[str]:
        log.write("extract\\n")
        return text.split()

    @step(name="cli.count", semantics=StepConfiguration(step_type=StepType.STOCHASTIC))
    def count(words) -> int:
        log.write("count\\n")
        return len(words.value)

    @step(name="cli.other")
    def other(n: int) -> int:
        log.write("other\\n")
        return n + 1

    with Engine(SQLiteStore(sys.argv[1])) as engine, use_engine(engine):
        words = extract("a b c")
        total = count(words)
        side = other(1)
        print(words.node_id, total.node_id, side.node_id)
    """
)


def musubi(*args: str, db: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "musubi_core.cli"]
    if db is not None:
        argv += ["--db", str(db)]
    return subprocess.run(
        [*argv, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )


@pytest.fixture
def recorded(tmp_path: Path) -> tuple[Path, Path, Path, list[str]]:
    db, log, script = tmp_path / "cli.db", tmp_path / "calls.log", tmp_path / "pipeline.py"
    script.write_text(PIPELINE)
    out = subprocess.run(
        [sys.executable, str(script), str(db), str(log)],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    return db, log, script, out.stdout.split()


def rerun(db: Path, log: Path, script: Path) -> list[str]:
    before = log.read_text().splitlines()
    subprocess.run(
        [sys.executable, str(script), str(db), str(log)],
        check=True,
        capture_output=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    return log.read_text().splitlines()[len(before) :]


def test_stats_counts_replays(recorded: tuple[Path, Path, Path, list[str]]) -> None:
    db, log, script, _ = recorded
    assert rerun(db, log, script) == []
    res = musubi("stats", "--json", db=db)
    assert res.returncode == 0, res.stderr
    stats = json.loads(res.stdout)
    assert stats["nodes"] == 3
    assert stats["executions"] == 3
    assert stats["replays"] == 3
    text = musubi("stats", db=db)
    assert "replay rate: 50.0%" in text.stdout


def test_invalidate_by_prefix_recomputes_exactly_descendants(
    recorded: tuple[Path, Path, Path, list[str]],
) -> None:
    db, log, script, (extract_id, count_id, other_id) = recorded
    res = musubi("invalidate", extract_id[:10], "--json", db=db)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["invalidated"] == 2
    with sqlite3.connect(db) as conn:
        statuses = dict(conn.execute("SELECT node_id, status FROM musubi_nodes").fetchall())
    assert statuses == {extract_id: "stale", count_id: "stale", other_id: "done"}
    # extract re-runs; its output is unchanged, so count replays (early cutoff).
    assert rerun(db, log, script) == ["extract"]


def test_show_explain_and_lineage_formats(recorded: tuple[Path, Path, Path, list[str]]) -> None:
    db, _log, _script, (extract_id, count_id, _other) = recorded
    show = musubi("show", count_id[:8], "--json", db=db)
    assert show.returncode == 0, show.stderr
    data = json.loads(show.stdout)
    assert data["node_id"] == count_id and data["value"] == 3
    assert {"parent": extract_id, "child": count_id, "kind": "data"}.items() <= data["edges"][0].items()

    explain = musubi("explain", count_id[:8], "--json", db=db)
    assert json.loads(explain.stdout)["reason"] == "hit"

    text = musubi("lineage", count_id[:8], db=db).stdout
    assert "extract" in text and "--data-->" in text
    dot = musubi("lineage", count_id[:8], "--format", "dot", db=db).stdout
    assert dot.startswith("digraph") and f'"{extract_id}" -> "{count_id}"' in dot
    mermaid = musubi("lineage", count_id[:8], "--format", "mermaid", db=db).stdout
    assert f"n{extract_id} --> n{count_id}" in mermaid
    graph = json.loads(musubi("lineage", count_id[:8], "--format", "json", db=db).stdout)
    assert {n["node_id"] for n in graph["nodes"]} == {extract_id, count_id}


def test_errors_and_exit_codes(tmp_path: Path, recorded: tuple[Path, Path, Path, list[str]]) -> None:
    db = recorded[0]
    missing = musubi("show", "ffff", db=db)
    assert missing.returncode == 1 and "no node or call matches" in missing.stderr
    ambiguous = musubi("show", "", db=db)
    assert ambiguous.returncode == 1
    no_store = musubi("stats", db=tmp_path / "nothing.db")
    assert no_store.returncode == 1 and "no musubi store" in no_store.stderr
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE users (id INTEGER)")
    schema = musubi("stats", db=foreign)
    assert schema.returncode == 2 and "did not create" in schema.stderr
    usage = musubi("lineage", db=db)
    assert usage.returncode == 2


def test_check_and_gc(recorded: tuple[Path, Path, Path, list[str]]) -> None:
    db = recorded[0]
    assert musubi("check", db=db).stdout.strip() == "ok"
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO musubi_artifacts VALUES ('orphan', 'x', x'00', 1, NULL, 0)")
    gc = musubi("gc", "--json", db=db)
    report = json.loads(gc.stdout)
    assert (report["nodes"], report["artifacts"], report["runs"]) == (0, 1, 0)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE musubi_nodes SET status = 'pending'")
    check = musubi("check", db=db)
    assert check.returncode == 1 and "pending" in check.stdout


def test_demo_shows_the_second_run_replaying(tmp_path: Path) -> None:
    res = musubi("demo", db=tmp_path / "demo.db")
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    run2 = next(line for line in lines if line.strip().startswith("run 2:"))
    assert "extract_facts=replayed" in run2 and "write_summary=replayed" in run2
    with sqlite3.connect(tmp_path / "demo.db") as conn:
        replays = conn.execute(f"SELECT SUM({REPLAYS}) FROM musubi_nodes").fetchone()[0]
    assert replays >= 2
