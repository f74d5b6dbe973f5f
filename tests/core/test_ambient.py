"""Calls outside any run (``AmbientRun``): they are acknowledged rows held by the run until the
recorder pulls them, so the recorder's bounds apply to them, a replay they count is committed
with them, and a closed recorder refuses them. Real SQLite files; the writer thread is kept
from committing on its own (a starved writer) so only the bounds can make rows reach disk."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from musubi_core import SQLiteStore, StoreError
from musubi_core.record import recorder_for
from musubi_core.record.ambient import _CHECK_EVERY, AmbientRun
from musubi_core.record.recorder import Recorder
from tests.support.storedb import scalar as _count


def _starved(db: str) -> tuple[SQLiteStore, Recorder]:
    store = SQLiteStore(db)
    rec = recorder_for(store)
    rec.interval = 3600.0  # the writer thread would never get to it
    rec.batch_rows = 10**9
    return store, rec


def _hit(ambient: AmbientRun, node_id: str) -> None:
    ambient.add("chat_model", "fake", node_id, "a" * 64, True, 0.0, 3, 4, 0.5, count_replay=True)


def test_held_calls_count_against_the_backlog_bound(tmp_path: Path) -> None:
    db = str(tmp_path / "m.db")
    store, rec = _starved(db)
    rec.max_backlog = 300
    ambient = AmbientRun(rec, "langchain", "calls outside a trace")
    peak = 0
    for i in range(3000):
        _hit(ambient, f"{i % 7:064x}")
        peak = max(peak, len(ambient._pending))
    # Past the bound the caller committed them: at most one check interval over it.
    assert peak <= rec.max_backlog + _CHECK_EVERY
    assert _count(db, "SELECT COUNT(*) FROM musubi_calls") >= 3000 - peak
    rec.flush()
    assert _count(db, "SELECT COUNT(*) FROM musubi_calls") == 3000
    # Every counted replay is committed, beside the calls that counted it.
    assert _count(db, "SELECT SUM(replays) FROM musubi_replays") == 3000
    assert _count(db, f"SELECT replays FROM musubi_replays WHERE node_id = '{0:064x}'") == 429
    ((calls, replays),) = [(r.calls, r.replays) for r in store.list_runs()]
    assert (calls, replays) == (3000, 3000)
    store.close()


def test_held_calls_never_wait_past_max_lag(tmp_path: Path) -> None:
    db = str(tmp_path / "m.db")
    store, rec = _starved(db)
    rec.max_lag = 0.2
    ambient = AmbientRun(rec, "langchain", "calls outside a trace")
    for _ in range(_CHECK_EVERY - 1):
        _hit(ambient, "b" * 64)
    assert _count(db, "SELECT COUNT(*) FROM musubi_calls") == 0  # nobody committed yet
    time.sleep(0.3)
    _hit(ambient, "b" * 64)  # the check: the oldest call is past max_lag
    assert _count(db, "SELECT COUNT(*) FROM musubi_calls") == _CHECK_EVERY
    assert _count(db, "SELECT replays FROM musubi_replays") == _CHECK_EVERY
    store.close()


def test_a_call_only_counts_the_replay_it_is_asked_to(tmp_path: Path) -> None:
    db = str(tmp_path / "m.db")
    store, rec = _starved(db)
    ambient = AmbientRun(rec, "langgraph", "node cache")
    ambient.record("graph_node", "n", node_id="c" * 64, replayed=True)  # counted elsewhere
    _hit(ambient, "c" * 64)
    ambient.add("chat_model", "fake", "c" * 64, None, False, 1.0, 3, 4, None)  # a miss
    rec.flush()
    assert _count(db, "SELECT COUNT(*) FROM musubi_calls") == 3
    assert _count(db, "SELECT replays FROM musubi_replays") == 1
    store.close()


def test_a_closed_recorder_refuses_calls(tmp_path: Path) -> None:
    db = str(tmp_path / "m.db")
    store, rec = _starved(db)
    ambient = AmbientRun(rec, "langchain", "calls outside a trace")
    _hit(ambient, "d" * 64)
    store.close()
    assert _count(db, "SELECT COUNT(*) FROM musubi_calls") == 1  # flushed on close
    with pytest.raises(StoreError, match="closed"):
        _hit(ambient, "d" * 64)
    assert not ambient._pending  # refused, not held where nothing will write it


def test_calls_of_runs_ended_by_idling_are_counted_in_their_own_runs(tmp_path: Path) -> None:
    db = str(tmp_path / "m.db")
    store, rec = _starved(db)
    # Every call finds the run idle, so each starts a run of its own: one pull then holds
    # the calls of several runs.
    ambient = AmbientRun(rec, "langchain", "calls outside a trace", idle_s=-1.0)
    for i in range(4):
        _hit(ambient, f"{i:064x}")
    rec.flush()
    runs = [(r.calls, r.replays, r.status) for r in store.list_runs()]
    assert runs == [(1, 1, "done")] * 4
    assert _count(db, "SELECT COUNT(DISTINCT run_id) FROM musubi_calls") == 4
    store.close()


def test_a_read_only_store_holds_nothing(tmp_path: Path) -> None:
    db = str(tmp_path / "m.db")
    SQLiteStore(db).close()
    store = SQLiteStore(db, read_only=True)
    ambient = AmbientRun(recorder_for(store), "langchain", "calls outside a trace")
    with pytest.warns(RuntimeWarning, match="read-only"):
        for _ in range(1000):
            _hit(ambient, "e" * 64)
    assert not ambient._pending and not ambient._replays  # nothing piles up unwritten
    store.close()
    assert _count(db, "SELECT COUNT(*) FROM musubi_calls") == 0


def test_a_run_current_at_a_normal_exit_ends_done(tmp_path: Path) -> None:
    """A script whose calls outside a trace end with the process: its run is done, not left
    running (which would read as interrupted). Real subprocess; a SIGKILLed one stays running."""
    import subprocess
    import sys

    db = str(tmp_path / "m.db")
    script = (
        "import sys\n"
        "from musubi_core import SQLiteStore\n"
        "from musubi_core.record import recorder_for\n"
        "from musubi_core.record.ambient import AmbientRun\n"
        "store = SQLiteStore(sys.argv[1])\n"
        "ambient = AmbientRun(recorder_for(store), 'langchain', 'calls outside a trace')\n"
        "for _ in range(3):\n"
        "    ambient.add('chat_model', 'fake', 'f' * 64, 'a' * 64, True, 0.0, 3, 4, 0.5,\n"
        "                count_replay=True)\n"
    )
    subprocess.run([sys.executable, "-c", script, db], check=True, timeout=60)
    store = SQLiteStore(db)
    assert [(r.calls, r.replays, r.status) for r in store.list_runs()] == [(3, 3, "done")]
    assert _count(db, "SELECT replays FROM musubi_replays") == 3
    store.close()
