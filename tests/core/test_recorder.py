"""The recorder's contract: bounded, timely, nothing acknowledged dropped, flushed on close,
fork safe. Real SQLite files; a real size-limited tmpfs for the full disk."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from musubi_core import Engine, SQLiteStore, StoreError, step, use_engine
from musubi_core.record import RunState, recorder_for
from musubi_core.record.recorder import Recorder
from tests.support.storedb import REPLAYS
from tests.support.storedb import scalar as _count


def _record_calls(rec: Recorder, n: int, name: str = "calls") -> RunState:
    run = RunState(rec, "script", name)
    for i in range(n):
        run.record(f"{uuid.uuid4().hex[:24]}", None, "chain", "op", inputs=f"input {i} " + "x" * 100)
    run.finish()
    return run


def _wait_for(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_rows_are_committed_in_the_background_within_the_interval(tmp_path: Path) -> None:
    db = str(tmp_path / "m.db")
    store = SQLiteStore(db)
    rec = recorder_for(store)
    rec.interval = 0.05
    _record_calls(rec, 5)
    # No flush: the writer thread commits on its own, and another connection sees it.
    assert _wait_for(lambda: _count(db, "SELECT COUNT(*) FROM musubi_calls") == 5)
    assert rec.backlog == 0 and rec.commits >= 1
    store.close()


def test_closing_the_store_flushes_every_engine_writing_to_it(tmp_path: Path) -> None:
    db = str(tmp_path / "m.db")
    store = SQLiteStore(db)
    engine, other = Engine(store), Engine(store, namespace="other")
    assert engine.recorder is other.recorder  # one writer per store

    @step(engine=engine)
    def double(x: int) -> int:
        return 2 * x

    first = double(1)
    for _ in range(7):
        assert double(1).replayed
    # The store is closed before the engines that counted the replays: nothing is lost.
    store.close()
    assert _count(db, f"SELECT {REPLAYS} FROM musubi_nodes WHERE node_id = '{first.node_id}'") == 7
    assert _count(db, "SELECT COUNT(*) FROM musubi_calls") == 8
    with pytest.raises(StoreError):
        engine.recorder.submit(replays=("x",))  # closed: refused, not silently dropped


def test_backlog_is_bounded_the_caller_commits_past_the_bound(tmp_path: Path) -> None:
    db = str(tmp_path / "m.db")
    store = SQLiteStore(db)
    rec = recorder_for(store)
    rec.interval = 3600.0  # the writer thread would never get to it
    rec.batch_rows = 10**9
    rec.max_backlog = 100
    peak = 0
    run = RunState(rec, "script", "bounded")
    for i in range(1000):
        run.record(f"{i:024x}", None, "chain", "op")
        peak = max(peak, rec.backlog)
    assert peak <= rec.max_backlog
    assert _count(db, "SELECT COUNT(*) FROM musubi_calls") >= 900  # committed by the callers
    rec.flush()
    assert _count(db, "SELECT COUNT(*) FROM musubi_calls") == 1000
    store.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MB tmpfs (root only), unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last byte; returns the filler."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (65536, 512):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * chunk)
    return filler


def test_a_failed_commit_keeps_its_rows_and_retries_after_the_disk_is_freed(
    small_disk: Path,
) -> None:
    db = str(small_disk / "m.db")
    store = SQLiteStore(db)
    rec = recorder_for(store)
    rec.interval = 0.05
    errors: list[BaseException] = []
    rec.on_error = errors.append
    engine = Engine(store)

    @step(engine=engine)
    def echo(x: int) -> int:
        return x

    first = echo(1)
    engine.flush()
    filler = _fill(small_disk)
    with use_engine(engine):
        for _ in range(50):
            assert echo(1).replayed  # the replays still answer while the disk is full
    _record_calls(rec, 60, "while full")
    with pytest.raises(StoreError, match="full"):
        rec.flush()
    assert _wait_for(lambda: bool(errors))  # the writer thread failed too, and said so
    assert rec.backlog >= 110  # nothing was dropped
    filler.unlink()
    assert _wait_for(lambda: rec.backlog == 0)  # retried by the writer thread
    engine.close()
    node = f"SELECT {REPLAYS} FROM musubi_nodes WHERE node_id = '{first.node_id}'"
    assert _count(db, node) == 50
    assert _count(db, "SELECT COUNT(*) FROM musubi_calls") == 1 + 50 + 60
    assert _count(db, "SELECT COUNT(*) FROM musubi_runs") == 1 + 50 + 1  # own runs + the script


def test_a_forked_child_starts_empty_and_the_parent_commits_its_own_rows(tmp_path: Path) -> None:
    db = str(tmp_path / "m.db")
    store = SQLiteStore(db)
    rec = recorder_for(store)
    rec.interval = 3600.0
    _record_calls(rec, 10, "parent")
    pid = os.fork()
    if pid == 0:  # the child: its backlog is empty; what it records is its own
        code = 0
        try:
            if rec.backlog != 0:
                code = 3
            else:
                _record_calls(rec, 3, "child")
                rec.flush()
        except BaseException:
            code = 4
        os._exit(code)
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert _count(db, "SELECT COUNT(*) FROM musubi_calls") == 3
    rec.flush()
    assert _count(db, "SELECT COUNT(*) FROM musubi_calls") == 13
    store.close()


def test_no_row_waits_past_max_lag_while_commits_succeed(tmp_path: Path) -> None:
    """A writer thread that never wakes on its own (a starved one): the next row submitted after
    ``max_lag`` has the backlog committed before it is accepted."""
    db = str(tmp_path / "m.db")
    store = SQLiteStore(db)
    rec = recorder_for(store)
    rec.interval = 3600.0
    rec.batch_rows = 10**9
    rec.max_lag = 0.2
    _record_calls(rec, 5, "early")
    assert _count(db, "SELECT COUNT(*) FROM musubi_calls") == 0  # nobody committed yet
    time.sleep(0.3)
    _record_calls(rec, 1, "late")
    assert _count(db, "SELECT COUNT(*) FROM musubi_calls") >= 5  # the old rows went first
    store.close()
    assert _count(db, "SELECT COUNT(*) FROM musubi_calls") == 6


def test_replays_are_counted_beside_the_node_row_and_add_to_older_counts(tmp_path: Path) -> None:
    """Counting a replay writes the node's narrow counter row, never its own row (which
    carries the call's material): the node row is untouched, and a count kept in the node row
    by an older musubi still adds."""
    db = str(tmp_path / "m.db")
    big = "context " * 2000  # a long prompt's worth of input, kept in the node's row

    with Engine(SQLiteStore(db)) as engine:

        @step(engine=engine)
        def answer(prompt: str) -> str:
            return prompt[:5]

        first = answer(big)
        node = f"node_id = '{first.node_id}'"
        row_before = _count(db, f"SELECT length(CAST(meta AS BLOB)) + length(op) FROM musubi_nodes WHERE {node}")
        con = sqlite3.connect(db)
        with con:  # a count from before the counter table (a migrated file)
            con.execute(f"UPDATE musubi_nodes SET replay_count = 2 WHERE {node}")
        con.close()
        for _ in range(3):
            assert answer(big).replayed
        engine.flush()
        assert engine.store.get_node(first.node_id).replay_count == 5  # type: ignore[union-attr]
    assert _count(db, f"SELECT replay_count FROM musubi_nodes WHERE {node}") == 2
    assert _count(db, f"SELECT replays FROM musubi_replays WHERE {node}") == 3
    assert _count(db, f"SELECT {REPLAYS} FROM musubi_nodes WHERE {node}") == 5
    assert _count(
        db, f"SELECT length(CAST(meta AS BLOB)) + length(op) FROM musubi_nodes WHERE {node}"
    ) == row_before


def test_a_commit_in_flight_past_max_lag_makes_new_rows_wait(tmp_path: Path) -> None:
    """The rows of a commit that cannot finish (here: another connection holds the write lock)
    count toward max_lag: once they are that old, a new row waits for the commit instead of
    being acknowledged, so what a SIGKILL can lose does not grow while the writer is stuck."""
    import threading

    db = str(tmp_path / "m.db")
    store = SQLiteStore(db)
    rec = recorder_for(store)
    rec.interval, rec.max_lag = 0.05, 0.3
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the writer's next commit waits for this lock
    try:
        rec.replay("a" * 64)
        # The writer took the row and is inside its commit, waiting for the lock.
        assert _wait_for(lambda: rec.backlog == 0)
        time.sleep(0.5)  # past max_lag
        rec.replay("b" * 64)  # the first row of an empty backlog is accepted
        returned = threading.Event()

        def third() -> None:
            rec.replay("c" * 64)
            returned.set()

        thread = threading.Thread(target=third)
        thread.start()
        # It waits for the stuck commit, however long: not acknowledged yet.
        assert not returned.wait(1.0)
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    thread.join(10)
    assert returned.is_set()
    rec.flush()
    counted = store.query(lambda c: c.execute("SELECT COUNT(*) FROM musubi_replays").fetchone()[0])
    assert counted == 3  # nothing acknowledged was dropped
    store.close()
