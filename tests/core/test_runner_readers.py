"""Readers inspecting a live run: a ``sqlite3`` poller and repeated
``musubi steps`` subprocesses, throughout a 2,000-step run in another
process. The writer must not see an error, and no committed row may go
missing. (The predecessor runner turns SQLite's locking off, so this is
exactly where it breaks.)"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from _runner_support import cli, lines, spawn

STEPS = 2000


def test_readers_during_a_2000_step_run(tmp_path: Path) -> None:
    db, side = tmp_path / "task.db", tmp_path / "side.txt"
    writer = spawn(db, side, STEPS, CHILD_STEP_DELAY="0", CHILD_SLEEP="1ms")
    errors: list[str] = []
    counts: list[int] = []
    cli_counts: list[int] = []
    stop = threading.Event()

    def poll_sqlite() -> None:
        while not stop.is_set():
            try:
                conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
                try:
                    n = conn.execute(
                        "SELECT COUNT(*) FROM musubi_run_steps WHERE status = 'done'"
                    ).fetchone()[0]
                    # Every committed step has its artifact: no torn checkpoint.
                    orphans = conn.execute(
                        "SELECT COUNT(*) FROM musubi_run_steps s WHERE s.status = 'done' AND "
                        "NOT EXISTS (SELECT 1 FROM musubi_artifacts a "
                        "WHERE a.artifact_id = s.artifact_id)"
                    ).fetchone()[0]
                finally:
                    conn.close()
            except sqlite3.OperationalError as err:
                if "no such table" in str(err) or "unable to open" in str(err):
                    time.sleep(0.01)  # the writer has not created the file yet
                    continue
                errors.append(f"sqlite3: {err}")
                continue
            if orphans:
                errors.append(f"{orphans} done steps without artifact")
            counts.append(n)

    def poll_cli() -> None:
        while not stop.is_set():
            if not db.exists():
                time.sleep(0.02)
                continue
            proc = cli("--db", str(db), "steps", "default", "--json")
            if proc.returncode != 0:
                if "no run 'default'" in proc.stderr or "no musubi store" in proc.stderr:
                    continue
                errors.append(f"musubi steps exited {proc.returncode}: {proc.stderr}")
                continue
            data = json.loads(proc.stdout)
            cli_counts.append(sum(1 for s in data["steps"] if s["status"] == "done"))

    threads = [threading.Thread(target=poll_sqlite), threading.Thread(target=poll_cli)]
    for t in threads:
        t.start()
    try:
        out, err = writer.communicate(timeout=120)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)

    assert writer.returncode == 0, err
    assert err == ""
    assert not errors, errors[:5]
    # Readers really overlapped the run, and never saw a row disappear.
    live = [c for c in counts if 0 < c < STEPS + 1]
    assert len(live) > 20, f"sqlite3 reader saw the run only {len(live)} times"
    assert sum(1 for c in cli_counts if 0 < c < STEPS + 1) >= 2, cli_counts
    assert counts == sorted(counts) and cli_counts == sorted(cli_counts)

    conn = sqlite3.connect(db)
    try:
        done = conn.execute(
            "SELECT name FROM musubi_run_steps WHERE status = 'done' ORDER BY seq"
        ).fetchall()
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    names = [d[0] for d in done]
    assert len(names) == STEPS + 1 and names[10] == "nap"
    starts = [e[1] for e in lines(side) if e[0] == "start"]
    assert len(starts) == STEPS == len(set(starts))
    assert json.loads(out)["i"] == STEPS - 1
