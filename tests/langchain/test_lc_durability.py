"""The recorder under a steady load of cache hits, in a real process: what a SIGKILL can lose
(at most the stated window) and memory (flat over 100k replayed invocations)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.storedb import REPLAYS

ROOT = Path(__file__).resolve().parents[2]
# docs/core.md states it: a SIGKILL loses at most the calls of the last ~2 seconds (the
# recorder commits rows a quarter of a second old and lets none wait past 1 s; a commit in flight when the process dies is lost).
LOSS_WINDOW_S = 2.0
CALLS_PER_INVOCATION = 4  # the sequence, the prompt, the model, the parser


def _start(db: Path, budget: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.replay_loop", str(db), budget, str(log)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait_ready(log: Path, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and log.read_text().startswith("ready"):
            return
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode() if proc.stderr else "child died")
        time.sleep(0.05)
    raise AssertionError("the child never got ready")


def test_sigkill_loses_only_the_stated_window(tmp_path: Path) -> None:
    db, log = tmp_path / "m.db", tmp_path / "log"
    proc = _start(db, "600", log)
    _wait_ready(log, proc)
    time.sleep(15)
    killed_at = time.time()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lines = log.read_text().splitlines()[1:]
    finished = [(int(n), float(t)) for n, t in (line.split() for line in lines if line.strip())]
    assert len(finished) > 1000, "the child barely ran"
    before_window = [n for n, t in finished if t <= killed_at - LOSS_WINDOW_S]
    con = sqlite3.connect(db)
    try:
        # One run per invocation; the 100 misses of the warm-up are runs too.
        (runs,) = con.execute("SELECT COUNT(*) FROM musubi_runs WHERE kind = 'langchain'").fetchone()
        (calls,) = con.execute("SELECT COUNT(*) FROM musubi_calls").fetchone()
        (replays,) = con.execute(f"SELECT SUM({REPLAYS}) FROM musubi_nodes").fetchone()
        (replayed_calls,) = con.execute(
            "SELECT COUNT(*) FROM musubi_calls WHERE replayed = 1"
        ).fetchone()
        (newest,) = con.execute("SELECT MAX(finished_at) FROM musubi_runs").fetchone()
    finally:
        con.close()
    lost = len(finished) - (runs - 100)
    assert runs - 100 >= len(before_window), (
        f"{lost} of {len(finished)} invocations lost; the newest committed run ended "
        f"{killed_at - newest:.2f} s before the kill"
    )
    assert calls >= CALLS_PER_INVOCATION * runs  # a committed run has all its calls
    assert replays >= len(before_window)  # every replay older than the window was counted
    assert replayed_calls >= len(before_window)
    # And not more than happened: nothing is counted twice.
    assert runs - 100 <= len(finished) and replays <= len(finished)


@pytest.mark.timeout(900)
def test_memory_stays_flat_over_100k_replayed_invocations(tmp_path: Path) -> None:
    db, log = tmp_path / "m.db", tmp_path / "log"
    proc = _start(db, "-100000", log)
    _out, err = proc.communicate(timeout=880)
    assert proc.returncode == 0, err.decode()
    rss = {
        int(n): int(b)
        for kind, n, b in (line.split() for line in log.read_text().splitlines()[1:])
        if kind == "rss"
    }
    assert sorted(rss) == list(range(10_000, 100_001, 10_000))
    growth = rss[100_000] / rss[10_000]
    assert growth <= 1.15, f"RSS grew {growth:.2f}x from 10k to 100k invocations: {rss}"
    con = sqlite3.connect(db)
    try:
        (calls,) = con.execute("SELECT COUNT(*) FROM musubi_calls").fetchone()
    finally:
        con.close()
    assert calls == CALLS_PER_INVOCATION * 100_100  # every call of every invocation committed
