"""Durable runs on PostgreSQL: one writer per run through a session-level advisory lock, taken
over when its holder is killed, with committed steps never re-run (real worker processes,
SIGKILL, the CLI's exit code 75)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psycopg

from tests.core._runner_support import CHILD, child_env, kill, lines, wait_for
from tests.support.postgres import fresh_database

WORKERS, STEPS = 8, 10


def _spawn(url: str, side: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(CHILD), url, str(side), str(STEPS)],
        env=child_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _expected() -> dict[str, object]:
    acc = 7
    for i in range(STEPS):
        acc = (acc * 31 + i) % 1_000_003
    return {"i": STEPS - 1, "acc": acc}


def _starts(side: Path, pid: int) -> list[str]:
    return [p[1] for p in lines(side) if p[0] == "start" and p[-1] == str(pid)]


def test_eight_workers_one_runs_killed_holder_is_taken_over(pg_dsn: str, tmp_path: Path) -> None:
    url = fresh_database(pg_dsn)
    side = tmp_path / "side.txt"
    # Slow steps: the holder is still inside the run when the others try to start it.
    procs = [_spawn(url, side, CHILD_STEP_DELAY="0.5") for _ in range(WORKERS)]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            starters = {p[-1] for p in lines(side) if p[0] == "start"}
            exited = [p for p in procs if p.poll() is not None]
            if starters and len(exited) == WORKERS - 1:
                break
            time.sleep(0.01)
        (holder_pid,) = {p[-1] for p in lines(side) if p[0] == "start"}
        holder = next(p for p in procs if str(p.pid) == holder_pid)
        for proc in procs:
            if proc is holder:
                continue
            _out, err = proc.communicate(timeout=60)
            assert proc.returncode != 0 and "LockedError" in err, err
        # While it is held, the CLI refuses the same run with exit code 75.
        flows = tmp_path / "flows.py"
        flows.write_text(textwrap.dedent("""
            def body(ctx):
                return ctx.step("s0000", lambda: "stolen")
        """))
        locked = subprocess.run(
            [sys.executable, "-m", "musubi_core.cli", "run", "flows:body", "--db", url],
            cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120,
        )
        assert locked.returncode == 75, locked.stderr
        # SIGKILL the holder in the middle of a step, after some steps committed.
        assert wait_for(side, holder.pid, "committed", "s0003", proc=holder, timeout=60)
        assert wait_for(side, holder.pid, "start", "s0004", proc=holder, timeout=60)
        assert kill(holder)
    finally:
        for proc in procs:
            kill(proc)
    with psycopg.connect(url) as pg:
        done = {r[0] for r in pg.execute(
            "SELECT name FROM musubi.musubi_run_steps WHERE status = 'done'").fetchall()}
    # What the database holds is exactly what the killed holder saw committed; the step it
    # was in the middle of (started, not committed) is not among it.
    mine = [p for p in lines(side) if p[-1] == str(holder.pid)]
    acked = {p[1] for p in mine if p[0] == "committed"}
    in_flight = {p[1] for p in mine if p[0] == "start"} - acked
    assert done == acked and len(done) >= 4 and len(in_flight) == 1, (done, in_flight)
    # The next start takes the run over (the dead session's lock is gone) and finishes it.
    nxt = _spawn(url, side, CHILD_STEP_DELAY="0")
    out, err = nxt.communicate(timeout=120)
    assert nxt.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert {k: result[k] for k in ("i", "acc")} == _expected()
    # Committed steps did not run again: the new worker started only what had not committed.
    assert _starts(side, nxt.pid) == sorted(f"s{i:04d}" for i in range(STEPS) if f"s{i:04d}" not in done)
    with psycopg.connect(url) as pg:
        attempts = dict(pg.execute(
            "SELECT name, attempts FROM musubi.musubi_run_steps").fetchall())
        run = pg.execute("SELECT status, attempts FROM musubi.musubi_runs").fetchone()
    assert all(attempts[name] == 1 for name in done), attempts
    assert attempts[in_flight.pop()] == 2 and run == ("done", 2)
