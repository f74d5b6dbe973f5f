"""Single flight (``@step(single_flight=True)``), on SQLite and on PostgreSQL, with real worker
processes: concurrent misses of one node execute once; a killed holder releases its flight;
a waiter past its timeout executes itself, with one warning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.core.conftest import ROOT

# Every test here runs on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_BACKENDS = True


def _workers(target: str, log: Path, keys: list[str], n: int, **env: str) -> list[subprocess.Popen[str]]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.support.flight_worker", target, str(log), ",".join(keys)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(n)
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", (
            proc.stderr.read() if proc.stderr else ""
        )
    for proc in procs:  # all connected: release them at once
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    return procs


def _report(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _executions(log: Path) -> list[tuple[str, str]]:
    if not log.exists():
        return []
    return [(p[1], p[2]) for p in (line.split() for line in log.read_text().splitlines()) if p]


def _until_executing(log: Path, holder: subprocess.Popen[str]) -> None:
    """Wait until ``holder`` is inside the step (holding its flight)."""
    deadline = time.monotonic() + 60
    while not _executions(log):
        assert time.monotonic() < deadline and holder.poll() is None
        time.sleep(0.01)


def test_concurrent_misses_execute_once(store_target: str, tmp_path: Path) -> None:
    log = tmp_path / "exec.log"
    keys = [f"k{i % 5}" for i in range(12)]  # 12 calls, 5 distinct
    reports = [_report(p) for p in _workers(store_target, log, keys, 8)]
    assert all(r["values"] == [k.upper() for k in keys] for r in reports)
    assert all(r["warnings"] == [] for r in reports)
    executed = [key for key, _pid in _executions(log)]
    assert sorted(executed) == sorted(set(keys))  # each distinct call exactly once


def test_a_killed_holder_releases_its_flight(store_target: str, tmp_path: Path) -> None:
    log, hold = tmp_path / "exec.log", tmp_path / "hold"
    hold.write_text("")
    (holder,) = _workers(store_target, log, ["x"], 1, FLIGHT_HOLD=str(hold))
    _until_executing(log, holder)
    waiters = _workers(store_target, log, ["x"], 3, FLIGHT_DELAY="0")
    time.sleep(0.5)  # the waiters are polling the held flight (nothing is asserted on time)
    assert len(_executions(log)) == 1  # none of them executed while the holder lived
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    reports = [_report(w) for w in waiters]
    assert all(r["values"] == ["X"] and r["warnings"] == [] for r in reports)
    executed = _executions(log)
    assert len(executed) == 2 and executed[0][1] == str(holder.pid)  # the holder, one taker
    hold.unlink()


def test_a_waiter_past_its_timeout_executes_with_one_warning(
    store_target: str, tmp_path: Path
) -> None:
    log, hold = tmp_path / "exec.log", tmp_path / "hold"
    hold.write_text("")
    (holder,) = _workers(store_target, log, ["y"], 1, FLIGHT_HOLD=str(hold))
    _until_executing(log, holder)
    (waiter,) = _workers(store_target, log, ["y", "y2"], 1, FLIGHT_TIMEOUT="0.5", FLIGHT_DELAY="0")
    report = _report(waiter)
    hold.unlink()
    assert _report(holder)["values"] == ["Y"]
    assert report["values"] == ["Y", "Y2"]
    assert len(report["warnings"]) == 1 and "executing it here too" in report["warnings"][0]
    assert sorted(k for k, _ in _executions(log)) == ["y", "y", "y2"]
