"""``SQLiteStore(path, size_limit=...)`` and ``gc(max_bytes=...)`` on real files of a measurable
size: the store stays under its limit by evicting the least recently used entries, hands the
pages back to the file system, and never evicts the checkpoints of an unfinished durable run,
which resumes from them without re-running a committed step."""

from __future__ import annotations

import json
import os
import sqlite3
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from musubi_core import ConfigError, Engine, SQLiteStore, step, use_engine

RunPy = Callable[..., Any]  # the run_py fixture of conftest.py

MB = 1_000_000
BLOB = 30_000  # bytes per entry: 100 entries are 3 MB

# Writes entries FIRST..LAST-1 of BLOB bytes each (random, so nothing compresses them away),
# with the store's size limit LIMIT ("none" for no limit). Prints which bodies ran and the
# largest size the store reached, as SQLite counts it, after any write.
FILL = """
import json, os, sys
from musubi_core import Engine, SQLiteStore, step, use_engine

db, first, last, size, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
ran = []

@step(name="gc.blob")
def blob(i: int, size: int) -> str:
    ran.append(i)
    return os.urandom(size // 2).hex()

store = SQLiteStore(db, size_limit=None if limit == "none" else limit)
peak = 0
with Engine(store) as engine, use_engine(engine):
    for i in range(first, last):
        blob(i, size)
        peak = max(peak, store.stats()["size"]["used_bytes"])
print(json.dumps({"ran": ran, "peak": peak}))
"""

# A durable run whose third step kills the process (os._exit: no cleanup, like kill -9) unless
# told not to; every step body notes that it ran in LOG.
DURABLE = """
import os, sys
from musubi_core import run

db, log, crash = sys.argv[1], sys.argv[2], sys.argv[3] == "crash"

def note(name):
    with open(log, "a") as f:
        f.write(name + "\\n")

def first():
    note("a")
    return "A" * 300_000

def second():
    note("b")
    return "B" * 300_000

def workflow(ctx):
    a = ctx.step("a", first)
    b = ctx.step("b", second)

    def third():
        note("c")
        if crash:
            os._exit(3)
        return len(a) + len(b)

    return ctx.step("c", third)

print(run(db, workflow, run_id="job"))
"""


@pytest.fixture
def fill(run_py: RunPy, tmp_path: Path) -> Callable[..., dict[str, Any]]:
    def go(db: Path, first: int, last: int, limit: str = "none", size: int = BLOB) -> dict[str, Any]:
        proc = run_py(FILL, str(db), str(first), str(last), str(size), limit)
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result

    return go


def used_bytes(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * conn.execute("PRAGMA page_size").fetchone()[0])
    finally:
        conn.close()


def test_size_limit_keeps_a_real_file_under_its_limit(
    fill: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    db = tmp_path / "limited.db"
    first = fill(db, 0, 100, limit="1MB")  # 3 MB of entries through a 1 MB store
    assert first["ran"] == list(range(100))
    # Enforced after commits: it never got far past its limit, and it closed under it, on disk
    # too (the freed pages went back to the file system; the -wal was emptied on close).
    assert first["peak"] <= MB + 3 * BLOB, first["peak"]
    assert os.path.getsize(db) <= MB
    assert used_bytes(db) <= MB
    assert not os.path.exists(f"{db}-wal") or os.path.getsize(f"{db}-wal") == 0
    # The least recently used entries went; the most recent ones replay.
    again = fill(db, 0, 100, limit="none")
    assert 0 in again["ran"] and 99 not in again["ran"] and 95 not in again["ran"]
    kept = [i for i in range(100) if i not in again["ran"]]
    assert kept == list(range(kept[0], 100)) and len(kept) >= 20, kept


def test_size_limit_never_evicts_an_unfinished_durable_run(
    run_py: RunPy, fill: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    db, log = tmp_path / "durable.db", tmp_path / "steps.log"
    crashed = run_py(DURABLE, str(db), str(log), "crash", check=False)
    assert crashed.returncode == 3 and log.read_text().split() == ["a", "b", "c"]
    # The run's two checkpoints (600 KB) are the oldest entries of the store; 3 MB of newer
    # entries go through it with a 1 MB limit.
    filled = fill(db, 0, 100, limit="1MB")
    assert filled["ran"] == list(range(100))
    assert used_bytes(db) <= MB
    conn = sqlite3.connect(db)
    try:
        steps = conn.execute(
            "SELECT s.name, s.status, s.node_id IN (SELECT node_id FROM musubi_nodes), "
            "s.artifact_id IN (SELECT artifact_id FROM musubi_artifacts) "
            "FROM musubi_run_steps s WHERE s.run_id = 'job' ORDER BY s.seq"
        ).fetchall()
        blobs = conn.execute("SELECT COUNT(*) FROM musubi_nodes WHERE op_name = 'gc.blob'")
        kept_blobs = blobs.fetchone()[0]
    finally:
        conn.close()
    assert steps[:2] == [("a", "done", 1, 1), ("b", "done", 1, 1)], steps
    assert kept_blobs < 100  # eviction did happen, around the run's checkpoints
    # The run resumes from its checkpoints: a and b are not run again.
    resumed = run_py(DURABLE, str(db), str(log), "finish")
    assert resumed.stdout.strip() == "600000"
    assert log.read_text().split() == ["a", "b", "c", "c"]


def test_size_limit_warns_once_when_only_protected_entries_are_left(
    run_py: RunPy, tmp_path: Path
) -> None:
    db, log = tmp_path / "durable.db", tmp_path / "steps.log"
    run_py(DURABLE, str(db), str(log), "crash", check=False)
    # 600 KB of checkpoints of an unfinished run cannot fit in 400 KB: they stay, and the
    # store says why, once.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = SQLiteStore(db, size_limit="400KB")
        report = store.enforce_size_limit()
        assert report is not None and report["over_limit"]
        assert report["kept"]["unfinished_durable_runs"] == 1
        assert store.enforce_size_limit() is None  # no growth since: not tried again
        store.close()
    messages = [str(w.message) for w in caught if "size_limit" in str(w.message)]
    assert len(messages) == 1 and "unfinished durable runs" in messages[0], messages
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT COUNT(*) FROM musubi_run_steps WHERE status = 'done'"
                            ).fetchone()[0] == 2
    finally:
        conn.close()


def test_size_check_runs_after_commits_never_on_lookups(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "checks.db", size_limit="50MB")
    measured = 0
    measure = store._used_bytes

    def counting(c: Any) -> int | None:
        nonlocal measured
        measured += 1
        return measure(c)

    store._used_bytes = counting  # type: ignore[method-assign]
    with Engine(store) as engine, use_engine(engine):

        @step(name="gc.small")
        def small(i: int) -> int:
            return i

        for i in range(300):
            small(i)
        writes = measured
        for _ in range(5):
            for i in range(300):
                assert small(i).replayed
        engine.flush()
        assert measured == writes  # 1,500 lookups measured nothing
    # Far below its limit the store measures itself every SIZE_CHECK_EVERY commits at most
    # (300 calls commit 300 nodes, plus the recorder's batches of calls and runs).
    assert 1 <= writes <= 300 // SQLiteStore.SIZE_CHECK_EVERY + 8, writes


@pytest.mark.parametrize(
    ("limit", "says"),
    [("500M", "500MB"), ("500", "500MB"), ("1MiB", "1MB"), ("0MB", "more than 0"),
     ("lots", "decimal")],
)
def test_size_limit_refuses_ambiguous_sizes(tmp_path: Path, limit: str, says: str) -> None:
    with pytest.raises(ConfigError, match="size_limit") as err:
        SQLiteStore(tmp_path / "x.db", size_limit=limit)
    assert says in str(err.value)
    assert not (tmp_path / "x.db").exists()  # refused before anything was created


def test_gc_max_bytes_shrinks_a_new_file_in_place(
    fill: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    db = tmp_path / "big.db"
    fill(db, 0, 80)
    before = os.path.getsize(db)
    assert before > 2 * MB
    with SQLiteStore(db) as store:
        report = store.gc(max_bytes=MB)
    assert report["bytes_before"] > 2 * MB >= MB >= report["bytes_after"]
    assert report["file_bytes_after"] <= MB < report["file_bytes_before"]
    assert os.path.getsize(db) <= MB


def test_vacuum_shrinks_and_converts_an_older_file(
    fill: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    db = tmp_path / "old.db"
    fill(db, 0, 1)
    # A store created before auto_vacuum (as every store of earlier versions was).
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA auto_vacuum = NONE")
    conn.execute("VACUUM")
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    conn.close()
    fill(db, 1, 80)
    with SQLiteStore(db) as store:
        report = store.gc(max_bytes=MB)
        assert report["bytes_after"] <= MB
        size = store.stats()["size"]
    # The pages are free inside the file (SQLite reuses them) but the file keeps its size.
    assert os.path.getsize(db) > 2 * MB and size["free_bytes"] > MB
    assert not size["incremental_vacuum"]
    with SQLiteStore(db) as store:
        store.gc(vacuum=True)
        assert store.stats()["size"]["incremental_vacuum"]
    assert os.path.getsize(db) <= MB
    # Converted: later evictions shrink it in place.
    with SQLiteStore(db) as store:
        store.gc(max_bytes=MB // 2)
    assert os.path.getsize(db) <= MB // 2
