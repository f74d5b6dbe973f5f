"""The recorder's helper process: under a steady load another process commits the batches, and
the recorder's contract still holds (nothing acknowledged dropped, flushed on close, fork safe).
Real SQLite files, real processes, SIGKILL for crashes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from musubi_core import SQLiteStore, StoreError
from musubi_core.record import RunState, recorder_for
from musubi_core.record.recorder import Recorder
from musubi_core.record.writer_process import SPAWN_ROWS, Helpers, spawnable
from tests.support.forking import in_forked_child

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the helper process is POSIX only")

ROOT = Path(__file__).resolve().parents[2]


def _count(db: str) -> int:
    con = sqlite3.connect(db)
    try:
        return int(con.execute("SELECT COUNT(*) FROM musubi_calls").fetchone()[0])
    finally:
        con.close()


def _record(rec: Recorder, n: int) -> None:
    run = RunState(rec, "script", "calls")
    for i in range(n):
        run.record(uuid.uuid4().hex[:24], None, "chain", "op", inputs=f"input {i}")
    run.finish()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


def _with_helper(rec: Recorder) -> int:
    """Commit enough rows to start the helper and flush until it commits; its pid."""
    _record(rec, SPAWN_ROWS)
    rec.flush()
    deadline = time.monotonic() + 60
    while rec.helper_pid is None:
        assert time.monotonic() < deadline, "the helper process never became ready"
        time.sleep(0.05)
        _record(rec, 1)
        rec.flush()
    return rec.helper_pid


def _helped(tmp_path: Path) -> tuple[str, SQLiteStore, Recorder, int]:
    """A store in ``tmp_path`` whose recorder commits through a helper: (path, store,
    recorder, the helper's pid)."""
    db = str(tmp_path / "m.db")
    store = SQLiteStore(db)
    rec = recorder_for(store)
    return db, store, rec, _with_helper(rec)


def test_a_steady_load_is_committed_by_a_helper_process_and_close_ends_it(tmp_path: Path) -> None:
    db = str(tmp_path / "m.db")
    store = SQLiteStore(db)
    rec = recorder_for(store)
    pid = _with_helper(rec)
    assert pid != os.getpid() and _alive(pid)
    helper = rec._helpers.current
    before = _count(db)
    commits = helper.commits  # type: ignore[union-attr]
    in_process = rec.commits - helper.commits  # type: ignore[union-attr]
    _record(rec, 1000)
    rec.flush()
    # One commit, or two when the writer thread's interval passed while the rows were made (a
    # loaded machine): either way the helper made them.
    assert helper.commits in (commits + 1, commits + 2)  # type: ignore[union-attr]
    assert rec.commits - helper.commits == in_process  # type: ignore[union-attr]
    assert _count(db) == before + 1000  # every call, committed by the helper
    store.close()
    assert not _alive(pid)  # closing the store ended the helper
    assert _count(db) == before + 1000


def test_a_killed_helper_loses_nothing_this_process_commits_instead(tmp_path: Path) -> None:
    db, store, rec, pid = _helped(tmp_path)
    before = _count(db)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    _record(rec, 700)
    rec.flush()  # the helper is gone: this batch is committed here
    assert _count(db) == before + 700
    assert rec.helper_pid is None
    _record(rec, 5)
    store.close()
    assert _count(db) == before + 705


def test_a_failed_helper_commit_is_retried_here_and_raises_the_stores_error(tmp_path: Path) -> None:
    db = str(tmp_path / "m.db")
    store = SQLiteStore(db, timeout=0.3)
    rec = recorder_for(store)
    rec.interval = 3600.0  # only flush() commits
    _with_helper(rec)
    before = _count(db)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    _record(rec, 50)
    with pytest.raises(StoreError, match="locked"):
        rec.flush()
    assert rec.backlog >= 50  # kept
    holder.execute("ROLLBACK")
    holder.close()
    rec.flush()
    assert _count(db) == before + 50
    assert rec.helper_pid is not None  # a failed transaction does not end a healthy helper
    store.close()


def test_a_forked_child_never_writes_through_the_parents_helper(tmp_path: Path) -> None:
    db, store, rec, pid = _helped(tmp_path)
    before = _count(db)

    def child() -> int:
        if rec.helper_pid is not None:
            return 3
        _record(rec, 7)
        rec.flush()
        return 0

    assert in_forked_child(child) == 0
    assert _count(db) == before + 7
    assert rec.helper_pid == pid and _alive(pid)  # still the parent's, still serving it
    _record(rec, 600)
    rec.flush()
    assert _count(db) == before + 607
    store.close()


# An application that records calls until its recorder commits through a helper (the helper's
# pid and the calls so far on stdout, for the SIGKILL case), then runs TAIL.
_APP_HEAD = textwrap.dedent(
    """
    import sys, time, uuid, warnings
    warnings.simplefilter("always")
    sys.path.insert(0, {root!r})
    from musubi_core import SQLiteStore
    from musubi_core.record import RunState, recorder_for
    rec = recorder_for(SQLiteStore({db!r}))
    run = RunState(rec, "script", "calls")
    n = 0
    while rec.helper_pid is None:
        for _ in range(600):
            run.record(uuid.uuid4().hex[:24], None, "chain", "op", inputs="x")
            n += 1
        rec.flush()
        time.sleep(0.05)
    """
)
_APP = _APP_HEAD + textwrap.dedent(
    """
    print(rec.helper_pid, n, flush=True)
    while True:  # acknowledged rows the helper commits in batches, until the SIGKILL
        run.record(uuid.uuid4().hex[:24], None, "chain", "op", inputs="x")
    """
)


def test_sigkill_of_the_application_leaves_no_helper_and_a_sound_file(tmp_path: Path) -> None:
    db = str(tmp_path / "m.db")
    SQLiteStore(db).close()
    app = subprocess.Popen(
        [sys.executable, "-c", _APP.format(root=str(ROOT), db=db)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert app.stdout is not None
    line = app.stdout.readline().split()
    helper, flushed = int(line[0]), int(line[1])
    time.sleep(1.5)  # the app records; its writer thread hands batches to the helper
    app.send_signal(signal.SIGKILL)
    app.wait()
    deadline = time.monotonic() + 15
    while _alive(helper) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(helper)  # the helper saw the application go and ended itself
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    # Everything flushed is there, and the batches handed over after it too.
    assert _count(db) > flushed


def test_no_helper_for_memory_read_only_stores_or_when_turned_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = str(tmp_path / "m.db")
    store = SQLiteStore(db)
    assert spawnable(store) is not None
    monkeypatch.setenv("MUSUBI_WRITER", "thread")
    assert spawnable(store) is None
    monkeypatch.delenv("MUSUBI_WRITER")
    memory = SQLiteStore(":memory:")
    assert spawnable(memory) is None
    store.close()
    read_only = SQLiteStore(db, read_only=True)
    assert spawnable(read_only) is None
    read_only.close()
    memory.close()


_EXITING_APP = _APP_HEAD + textwrap.dedent(
    """
    for _ in range(5000):  # the writer thread may be mid-commit through the helper at exit
        run.record(uuid.uuid4().hex[:24], None, "chain", "op", inputs="x")
        n += 1
    print(rec.helper_pid, n, flush=True)
    """
)


def test_interpreter_exit_commits_everything_through_or_beside_the_helper(tmp_path: Path) -> None:
    db = str(tmp_path / "m.db")
    SQLiteStore(db).close()
    done = subprocess.run(
        [sys.executable, "-c", _EXITING_APP.format(root=str(ROOT), db=db)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr and "Error" not in done.stderr, done.stderr
    helper, recorded = (int(x) for x in done.stdout.split())
    assert _count(db) == recorded  # nothing acknowledged was lost at exit
    deadline = time.monotonic() + 10
    while _alive(helper) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(helper)


def test_the_helper_ignores_ctrl_c_and_keeps_committing(tmp_path: Path) -> None:
    db, store, rec, pid = _helped(tmp_path)
    before = _count(db)
    os.kill(pid, signal.SIGINT)  # what a terminal's Ctrl-C sends the whole process group
    time.sleep(0.3)
    assert _alive(pid)
    _record(rec, 600)
    rec.flush()
    assert rec.helper_pid == pid and _count(db) == before + 600
    store.close()


def test_a_recorder_starts_at_most_three_helpers(tmp_path: Path) -> None:
    db = str(tmp_path / "m.db")
    store = SQLiteStore(db)
    rec = recorder_for(store)
    rec.interval = 3600.0  # only flush() commits
    started = []
    for _ in range(Helpers.MAX):
        pid = _with_helper(rec)
        started.append(pid)
        os.kill(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.02)
        before = _count(db)
        _record(rec, SPAWN_ROWS)
        rec.flush()  # the dead helper is found; this batch is committed here
        assert _count(db) == before + SPAWN_ROWS
    assert len(set(started)) == Helpers.MAX
    before = _count(db)
    _record(rec, SPAWN_ROWS)
    rec.flush()
    assert rec._helpers.current is False and rec.helper_pid is None  # no fourth one
    assert _count(db) == before + SPAWN_ROWS
    store.close()


def _unhelped(tmp_path: Path, batches: int) -> tuple[str, SQLiteStore, Recorder]:
    """A store whose recorder has helper = False, after ``batches`` flushes of 2 * SPAWN_ROWS
    rows each (a steady load that would start a helper)."""
    db = str(tmp_path / "m.db")
    store = SQLiteStore(db)
    rec = recorder_for(store)
    rec.helper = False
    for _ in range(batches):
        _record(rec, 2 * SPAWN_ROWS)
        rec.flush()
    return db, store, rec


def test_helper_false_keeps_every_commit_in_this_process(tmp_path: Path) -> None:
    db, store, rec = _unhelped(tmp_path, 3)
    assert rec._helpers.current is False and rec.helper_pid is None
    assert _count(db) == 6 * SPAWN_ROWS
    store.close()


def test_a_forked_child_of_a_recorder_without_a_helper_records(tmp_path: Path) -> None:
    # A recorder that found it cannot have a helper (helper = False, or a store without a
    # spec) still gives a forked child a working recorder of its own.
    db, store, rec = _unhelped(tmp_path, 1)
    assert rec._helpers.current is False

    def child() -> int:
        _record(rec, 5)
        rec.flush()
        return 0 if rec._helpers.current is None else 3

    assert in_forked_child(child) == 0
    assert _count(db) == 2 * SPAWN_ROWS + 5
    store.close()


def test_stores_without_a_writer_spec_are_written_in_process() -> None:
    from musubi_core.store import PostgresStore

    # spawnable() asks the store how a helper would open it; the PostgreSQL store has no answer.
    assert not hasattr(PostgresStore, "writer_process_spec")
