"""``musubi run``, ``musubi runs`` and ``musubi steps``: output and exit codes
(0 ok, 1 error, 2 usage/name/schema, 75 locked), in real subprocesses."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _runner_support import child_env, kill, spawn, wait_for

FLOWS = """
import os

def ok(ctx):
    a = ctx.step("a", lambda: 1)
    ctx.sleep("nap", "1ms")
    return ctx.step("b", lambda: {"v": a + 1})

def bad_name(ctx):
    ctx.step("no spaces please", lambda: 1)

def fails(ctx):
    ctx.step("a", lambda: 1)
    ctx.step("b", lambda: 1 / 0)

def changed(ctx):
    ctx.step("a", lambda: 1)
    ctx.step("b", lambda: 1 / 1)

async def async_ok(ctx):
    return await ctx.astep("x", lambda: 5)

def holds(ctx):
    return ctx.step("s0000", lambda: "second")
"""


@pytest.fixture
def flows(tmp_path: Path) -> Path:
    (tmp_path / "flows.py").write_text(textwrap.dedent(FLOWS))
    return tmp_path


def musubi(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "musubi_core.cli", *args],
        cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=60,
    )


def test_run_then_inspect(flows: Path) -> None:
    proc = musubi(flows, "run", "flows:ok", "--db", "t.db", "--run-id", "r1")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"v": 2}

    runs = musubi(flows, "--db", "t.db", "runs", "--json")
    assert runs.returncode == 0, runs.stderr
    (record,) = json.loads(runs.stdout)
    assert (record["run_id"], record["status"], record["steps_done"]) == ("r1", "done", 3)

    steps = musubi(flows, "steps", "r1", "--db", "t.db", "--json")
    data = json.loads(steps.stdout)
    assert [(s["name"], s["kind"], s["status"]) for s in data["steps"]] == [
        ("a", "step", "done"), ("nap", "sleep", "done"), ("b", "step", "done")]

    # Each step is also a call of the run (kind run_step, or sleep), its op the step name.
    assert [(c["kind"], c["op_name"]) for c in data["calls"]] == [
        ("run_step", "a"), ("sleep", "nap"), ("run_step", "b")]

    text = musubi(flows, "--db", "t.db", "steps", "r1")
    assert text.returncode == 0 and "nap" in text.stdout and "sleep" in text.stdout
    assert "3/3 steps done" in text.stdout and "ATTEMPTS" in text.stdout
    table = musubi(flows, "--db", "t.db", "runs")
    assert "r1" in table.stdout and "3/3" in table.stdout and "durable" in table.stdout

    missing = musubi(flows, "--db", "t.db", "steps", "nope")
    assert missing.returncode == 1 and "no run matches 'nope'" in missing.stderr
    assert "`musubi runs`" in missing.stderr


def test_async_workflow(flows: Path) -> None:
    proc = musubi(flows, "run", "flows:async_ok", "--db", "t.db")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "5"


def test_exit_codes(flows: Path) -> None:
    assert musubi(flows, "run", "flows:bad_name", "--db", "t.db").returncode == 2
    assert musubi(flows, "run", "flows:missing", "--db", "t.db").returncode == 2
    assert musubi(flows, "run", "nomodule:x", "--db", "t.db").returncode == 2
    assert musubi(flows, "run", "flows", "--db", "t.db").returncode == 2
    assert musubi(flows, "run", "flows:ok", "--db", "t.db", "--run-id", "a b").returncode == 2
    failed = musubi(flows, "run", "flows:fails", "--db", "t.db", "--run-id", "f")
    assert failed.returncode == 1 and "ZeroDivisionError" in failed.stderr

    # A foreign database is a schema problem.
    conn = sqlite3.connect(flows / "foreign.db")
    conn.execute("CREATE TABLE other (x)")
    conn.commit()
    conn.close()
    assert musubi(flows, "run", "flows:ok", "--db", "foreign.db").returncode == 2


def test_divergence_and_rerun_from(flows: Path) -> None:
    (flows / "flows.py").write_text(textwrap.dedent(FLOWS).replace("1 / 0", "2 * 2"))
    assert musubi(flows, "run", "flows:fails", "--db", "t.db").returncode == 0
    source = textwrap.dedent(FLOWS).replace("1 / 0", "3 * 3")
    (flows / "flows.py").write_text(source)
    for pyc in (flows / "__pycache__").glob("*.pyc"):
        pyc.unlink()
    diverged = musubi(flows, "run", "flows:fails", "--db", "t.db")
    assert diverged.returncode == 1 and "--rerun-from b" in diverged.stderr
    assert musubi(flows, "run", "flows:fails", "--db", "t.db", "--rerun-from", "zz").returncode == 2
    accepted = musubi(flows, "run", "flows:fails", "--db", "t.db", "--rerun-from", "b")
    assert accepted.returncode == 0, accepted.stderr
    assert musubi(flows, "run", "flows:fails", "--db", "t.db").returncode == 0


def test_locked_run_exits_75(flows: Path) -> None:
    db, side, hold = flows / "t.db", flows / "side.txt", flows / "hold"
    hold.write_text("")
    proc = spawn(db, side, 2, CHILD_HOLD=str(hold))
    try:
        assert wait_for(side, proc.pid, "start", "s0000", proc=proc)
        locked = musubi(flows, "run", "flows:holds", "--db", "t.db")
        assert locked.returncode == 75, locked.stderr
        assert "another process" in locked.stderr
        # Reading a live run is fine, and shows the step in flight.
        steps = musubi(flows, "steps", "default", "--db", "t.db", "--json")
        data = json.loads(steps.stdout)
        assert data["run"]["status"] == "running"
        assert [(s["name"], s["status"]) for s in data["steps"]] == [("s0000", "pending")]
    finally:
        kill(proc)
    after = musubi(flows, "steps", "default", "--db", "t.db", "--json")
    assert json.loads(after.stdout)["run"]["status"] == "interrupted"
    assert os.path.exists(f"{db}.default.lock")
    assert musubi(flows, "run", "flows:holds", "--db", "t.db").returncode == 0
