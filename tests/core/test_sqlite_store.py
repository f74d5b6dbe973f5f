"""SQLiteStore specifics: lookups are index probes however long the history,
bad files give clear MusubiErrors, read-only files replay without recording, deleted files
give StoreError."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import statistics
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from musubi_core import (
    Engine,
    MusubiError,
    SchemaError,
    SQLiteStore,
    StoreError,
    step,
    use_engine,
)
from musubi_core.store import SCHEMA_VERSION, NodeWrite

# -- the file itself ------------------------------------------------------------------------


def test_new_store_layout(db_path: Path) -> None:
    with SQLiteStore(db_path) as store:
        assert store.stats()["nodes"] == 0
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        meta = dict(raw.execute("SELECT key, value FROM musubi_meta"))
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert meta["schema_version"] == str(SCHEMA_VERSION)
    assert meta["app"] == "musubi" and meta["hash_scheme"] == "musubi/1"
    assert all(name.startswith("musubi_") for name in tables)


def test_store_persists_across_reopen(db_path: Path) -> None:
    @step(name="persist.me")
    def f(x: int) -> int:
        return x + 1

    with Engine(SQLiteStore(db_path)) as engine, use_engine(engine):
        first = f(1)
    with Engine(SQLiteStore(db_path)) as engine, use_engine(engine):
        again = f(1)
    assert again.replayed and again.node_id == first.node_id


def test_a_musubi_store_can_share_a_file_only_if_created_by_musubi(db_path: Path) -> None:
    SQLiteStore(db_path).close()
    with sqlite3.connect(db_path) as raw:
        raw.execute("CREATE TABLE app_data (x)")  # added later by someone else
    with SQLiteStore(db_path) as store:
        assert store.stats()["nodes"] == 0


# -- files musubi cannot use ------------------------------------------------------------


def _assert_clear(err: MusubiError, path: Path, *hints: str) -> None:
    message = str(err)
    assert str(path) in message
    for hint in hints:
        assert hint in message, message


def test_newer_schema_version_is_a_schema_error(db_path: Path) -> None:
    SQLiteStore(db_path).close()
    with sqlite3.connect(db_path) as raw:
        raw.execute("UPDATE musubi_meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(SchemaError) as raised:
        SQLiteStore(db_path)
    _assert_clear(raised.value, db_path, "newer musubi", "pip install -U musubi-lineage")
    assert raised.value.found == "99" and raised.value.expected == str(SCHEMA_VERSION)
    # Nothing was changed in the file.
    with sqlite3.connect(db_path) as raw:
        assert raw.execute(
            "SELECT value FROM musubi_meta WHERE key = 'schema_version'"
        ).fetchone()[0] == "99"


def test_foreign_sqlite_file_is_a_schema_error(db_path: Path) -> None:
    with sqlite3.connect(db_path) as raw:
        raw.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        raw.execute("INSERT INTO users (name) VALUES ('ada')")
    with pytest.raises(SchemaError) as raised:
        SQLiteStore(db_path)
    _assert_clear(raised.value, db_path, "did not create", "MUSUBI_DB", "users")
    with sqlite3.connect(db_path) as raw:  # untouched: no musubi tables added
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"users"}


def test_foreign_app_meta_is_a_schema_error(db_path: Path) -> None:
    SQLiteStore(db_path).close()
    with sqlite3.connect(db_path) as raw:
        raw.execute("UPDATE musubi_meta SET value = 'other-app' WHERE key = 'app'")
    with pytest.raises(SchemaError, match="other-app"):
        SQLiteStore(db_path)


def test_non_sqlite_file_is_a_schema_error(db_path: Path) -> None:
    db_path.write_text("name,score\nada,10\n" * 200)
    with pytest.raises(SchemaError) as raised:
        SQLiteStore(db_path)
    _assert_clear(raised.value, db_path, "not a SQLite database", "MUSUBI_DB")
    assert db_path.read_text().startswith("name,score")


def _populated(db_path: Path, n: int = 300) -> None:
    @step(name="fill")
    def fill(i: int) -> str:
        return "x" * 500 + str(i)

    with Engine(SQLiteStore(db_path)) as engine, use_engine(engine):
        for i in range(n):
            fill(i)
    for suffix in ("-wal", "-shm"):
        assert not Path(f"{db_path}{suffix}").exists() or suffix == "-shm"


@pytest.mark.parametrize("keep", [50, 4096, 0.5], ids=["header", "first-page", "half"])
def test_truncated_file_is_a_clear_musubi_error(db_path: Path, keep: float) -> None:
    _populated(db_path)
    size = db_path.stat().st_size
    with open(db_path, "r+b") as fh:
        fh.truncate(int(size * keep) if isinstance(keep, float) else keep)
    with pytest.raises(MusubiError) as raised, SQLiteStore(db_path) as store:
        store.stats()
        store.check()
        for node in store.list_nodes(limit=1000):
            store.get_node_and_artifact(node.node_id)
    assert isinstance(raised.value, SchemaError | StoreError)
    message = str(raised.value)
    assert str(db_path) in message
    assert any(hint in message for hint in ("musubi", "MUSUBI_DB", "backup", "check")), message


# -- read-only and deleted files --------------------------------------------------------


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Make ``path`` unwritable, even for root (via the immutable attribute)."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        try:
            yield
        finally:
            path.chmod(0o644)
        return
    result = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot make a file read-only as root here: {result.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_read_only_file_in_a_writable_folder_replays_and_records_nothing(db_path: Path) -> None:
    calls: list[int] = []

    @step(name="ro.step")
    def f(x: int) -> int:
        calls.append(x)
        return x

    with Engine(SQLiteStore(db_path)) as engine, use_engine(engine):
        f(1)
    with read_only(db_path), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Engine(SQLiteStore(db_path)) as engine, use_engine(engine):
            assert f(1).replayed  # reading works
            assert f(2).value == 2 and f(2).value == 2  # computed twice: nothing recorded
            with pytest.raises(StoreError) as raised:
                engine.store.invalidate(f(1).node_id)
    assert calls == [1, 2, 2]
    assert len([w for w in caught if "read-only" in str(w.message)]) == 1
    assert "read-only" in str(raised.value) and str(db_path) in str(raised.value)
    assert isinstance(raised.value, MusubiError)


def test_deleted_file_mid_run_gives_store_error(db_path: Path) -> None:
    calls: list[int] = []

    @step(name="deleted.step")
    def f(x: int) -> int:
        calls.append(x)
        return x

    engine = Engine(SQLiteStore(db_path))
    try:
        with use_engine(engine):
            f(1)
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(f"{db_path}{suffix}")
            with pytest.raises(StoreError) as raised:
                f(2)
        assert "deleted" in str(raised.value) and str(db_path) in str(raised.value)
        assert calls == [1, 2]
    finally:
        with contextlib.suppress(MusubiError):
            engine.close()


def test_replaced_file_mid_run_gives_store_error(db_path: Path, tmp_path: Path) -> None:
    @step(name="replaced.step")
    def f(x: int) -> int:
        return x

    engine = Engine(SQLiteStore(db_path))
    try:
        with use_engine(engine):
            f(1)
            other = tmp_path / "other.db"
            SQLiteStore(other).close()
            os.replace(other, db_path)
            with pytest.raises(StoreError):
                f(2)
    finally:
        with contextlib.suppress(MusubiError):
            engine.close()


# -- lookups are index probes -------------------------------------------------------------


def _plans(conn: sqlite3.Connection, statements: list[str]) -> list[tuple[str, list[str]]]:
    out = []
    for sql in statements:
        head = sql.lstrip().split(None, 1)[0].upper()
        if head not in ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH"):
            continue
        details = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall()]
        out.append((sql, details))
    return out


def _fill_op(store: SQLiteStore, op_name: str, n: int) -> None:
    now = time.time()
    store.write(
        [
            NodeWrite(
                node_id=f"{i:064x}", op=f"{op_name}#x", op_name=op_name, kind="step",
                step_type="deterministic", input_hash=f"{i:064x}", status="done",
                finished_at=now,
            )
            for i in range(n)
        ]
    )


@pytest.mark.parametrize("history", [10, 10_000])
def test_a_miss_is_index_probes_only(db_path: Path, history: int) -> None:
    """Every statement of a miss (lookup, write, producer read) and of a
    replay uses an index: no SCAN of any table, whatever the history."""

    @step(name="probe.op")
    def op(i: int) -> int:
        return i

    store = SQLiteStore(db_path)
    _fill_op(store, "probe.op", history)
    with Engine(store) as engine, use_engine(engine):
        op(-1)  # warm up
        conn = store._conn()
        traced: list[str] = []
        conn.set_trace_callback(traced.append)
        try:
            op(-2)  # a miss
            engine.invalidate(op(-2).node_id)
            op(-2)  # a stale node: re-executes
        finally:
            conn.set_trace_callback(None)
        plans = _plans(conn, traced)
    assert len(plans) >= 6
    kinds = {sql.lstrip().split(None, 1)[0].upper() for sql, _ in plans}
    assert {"SELECT", "INSERT"} <= kinds
    for sql, details in plans:
        scans = [d for d in details if d.startswith("SCAN") and "CONSTANT ROW" not in d]
        # The one recursive walk (invalidation) scans only its own small queue; a batch of
        # replay counts scans only its own VALUES list (v), probing nodes by primary key.
        scans = [d for d in scans if d not in ("SCAN down", "SCAN d", "SCAN v")]
        assert not scans, f"{details}\n{sql}"
        assert not any("musubi_nodes" in d and d.startswith("SCAN") for d in details)


def test_miss_cost_does_not_grow_with_history(tmp_path: Path) -> None:
    """Printed for the record (no timing assertion): the median miss with 10
    and with 10,000 earlier nodes of the same operation."""
    medians = {}
    for history in (10, 10_000):
        store = SQLiteStore(tmp_path / f"h{history}.db")
        _fill_op(store, "timed.op", history)

        @step(name="timed.op")
        def op(i: int) -> int:
            return i

        samples = []
        with Engine(store) as engine, use_engine(engine):
            for i in range(300):
                started = time.perf_counter()
                op(i)
                samples.append(time.perf_counter() - started)
        medians[history] = statistics.median(samples) * 1e6
    print(
        f"\nmedian miss: {medians[10]:.0f} us with 10 earlier nodes, "
        f"{medians[10_000]:.0f} us with 10,000 (ratio {medians[10_000] / medians[10]:.2f})"
    )


def test_replay_overhead_baseline(engine: Engine) -> None:
    """Printed baseline: a replayed @step versus a bare call (median of many)."""

    def bare(text: str) -> str:
        return text.upper()

    stepped = step(name="overhead.upper")(bare)
    stepped("hello")
    bare_samples, step_samples = [], []
    for _ in range(2000):
        t0 = time.perf_counter()
        bare("hello")
        t1 = time.perf_counter()
        result = stepped("hello")
        t2 = time.perf_counter()
        bare_samples.append(t1 - t0)
        step_samples.append(t2 - t1)
    assert result.replayed
    engine.flush()
    record = engine.store.get_node(result.node_id)
    assert record is not None and record.replay_count == 2000
    print(
        f"\nreplayed @step median {statistics.median(step_samples) * 1e6:.1f} us, "
        f"bare call median {statistics.median(bare_samples) * 1e6:.2f} us"
    )
