"""Helpers for the durable-run tests: child processes, side files, checks."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).resolve().parent / "_runner_child.py"


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("MUSUBI_DB", None)
    env.update(extra)
    return env


def spawn(db: Path, side: Path, steps: int = 20, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(CHILD), str(db), str(side), str(steps)],
        env=child_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "musubi_core.cli", *args],
        env=child_env(), capture_output=True, text=True, timeout=timeout,
    )


def lines(side: Path) -> list[list[str]]:
    if not side.exists():
        return []
    return [line.split() for line in side.read_text().splitlines() if line.strip()]


def wait_for(side: Path, pid: int, event: str, name: str | None = None,
             proc: subprocess.Popen[str] | None = None, timeout: float = 30) -> bool:
    """Wait until the side file holds ``event [name] pid``; False if the
    process exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for parts in lines(side):
            if parts[0] == event and parts[-1] == str(pid) and (name is None or parts[1] == name):
                return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.002)
    raise AssertionError(f"timed out waiting for {event} {name or ''} from pid {pid}")


def kill(proc: subprocess.Popen[str]) -> bool:
    """SIGKILL ``proc``; True if it was still running (so it really died)."""
    alive = proc.poll() is None
    if alive:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    if proc.stdout:
        proc.stdout.close()
    if proc.stderr:
        proc.stderr.close()
    return alive and proc.returncode == -signal.SIGKILL


def integrity(db: Path) -> str:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def committed(db: Path | str, run_id: str = "default") -> set[str]:
    """The steps of ``run_id`` whose checkpoint committed (SQLite file or PostgreSQL URL)."""
    if str(db).startswith("postgresql://"):
        import psycopg

        with psycopg.connect(str(db)) as pg:
            if pg.execute("SELECT to_regclass('musubi.musubi_run_steps')").fetchone() == (None,):
                return set()
            found = pg.execute(
                "SELECT name FROM musubi.musubi_run_steps WHERE run_id = %s AND status = 'done'",
                (run_id,),
            ).fetchall()
        return {r[0] for r in found}
    db = Path(db)
    if not db.exists():
        return set()
    conn = sqlite3.connect(db, timeout=30)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        if "musubi_run_steps" not in tables:
            return set()
        rows = conn.execute(
            "SELECT name FROM musubi_run_steps WHERE run_id = ? AND status = 'done'", (run_id,)
        ).fetchall()
        return {r[0] for r in rows}
    finally:
        conn.close()
