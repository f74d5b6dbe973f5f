"""Many worker processes writing the same rows of one PostgreSQL store at once.

Each worker sends its batches over the same node ids in its own random order, which is what
deadlocked: row locks taken in different orders by concurrent transactions. The store writes
rows in key order and retries a transaction PostgreSQL aborted as a deadlock or serialization
failure, so every batch lands and no count is lost.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import psycopg

from musubi_core.errors import StoreError
from musubi_core.store import NodeWrite
from musubi_core.store.postgres import PostgresStore

ROOT = Path(__file__).resolve().parents[2]
WORKERS, BATCHES, IDS = 8, 10, 200


def _run_workers(pg_dsn: str, schema: str, mode: str, ids_file: Path) -> list[dict[str, Any]]:
    """Start WORKERS real processes, release them together, and collect their reports."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.postgres._pg_worker", pg_dsn, schema, mode,
             str(seed), str(BATCHES), str(ids_file)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in range(WORKERS)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip() == "ready", line + (proc.stderr.read() if proc.stderr else "")
        for proc in procs:  # every worker is connected: release them all at once
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        reports = []
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
            reports.append(json.loads(out.strip().splitlines()[-1]))
        return reports
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _ids(tmp_path: Path) -> tuple[list[str], Path]:
    ids = [uuid.uuid4().hex * 2 for _ in range(IDS)]
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("\n".join(ids))
    return ids, ids_file


def _column_sum(pg_dsn: str, schema: str, column: str) -> tuple[int, int]:
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute(f"SELECT COUNT(*), SUM({column}) FROM {schema}.musubi_nodes").fetchone()
    assert row is not None
    return int(row[0]), int(row[1] or 0)


def test_concurrent_add_replays_neither_deadlock_nor_lose_counts(pg_dsn: str, tmp_path: Path) -> None:
    schema = f"d{uuid.uuid4().hex[:8]}"
    ids, ids_file = _ids(tmp_path)
    with PostgresStore(pg_dsn, schema=schema) as store:
        store.write([NodeWrite(n, "op", "op", "step", "deterministic", "h" + n, "done") for n in ids])

    reports = _run_workers(pg_dsn, schema, "replays", ids_file)

    failures = [f for r in reports for f in r["failed"]]
    assert failures == [], failures[:3]
    assert sum(r["batches"] for r in reports) == WORKERS * BATCHES
    counted = (
        f"replay_count + COALESCE((SELECT r.replays FROM {schema}.musubi_replays r "
        "WHERE r.node_id = musubi_nodes.node_id), 0)"
    )
    assert _column_sum(pg_dsn, schema, counted) == (IDS, WORKERS * BATCHES * IDS)
    print(f"retries: {sum(r['retries'] or 0 for r in reports)}")


def test_concurrent_batch_writes_of_the_same_nodes_and_edges_all_land(
    pg_dsn: str, tmp_path: Path
) -> None:
    schema = f"w{uuid.uuid4().hex[:8]}"
    _, ids_file = _ids(tmp_path)
    PostgresStore(pg_dsn, schema=schema).close()

    reports = _run_workers(pg_dsn, schema, "writes", ids_file)

    failures = [f for r in reports for f in r["failed"]]
    assert failures == [], failures[:3]
    # Every write of a node counts one execution: none was lost.
    assert _column_sum(pg_dsn, schema, "exec_count") == (IDS, WORKERS * BATCHES * IDS)
    with psycopg.connect(pg_dsn) as conn:
        edges = conn.execute(f"SELECT COUNT(*) FROM {schema}.musubi_edges").fetchone()
        artifacts = conn.execute(f"SELECT COUNT(*) FROM {schema}.musubi_artifacts").fetchone()
    assert edges == (IDS,) and artifacts == (IDS,)
    print(f"retries: {sum(r['retries'] or 0 for r in reports)}")


# One more replay of a node, as the store counts it (its row in musubi_replays, locked until
# the counting transaction ends).
_COUNT_ONE = (
    "INSERT INTO {schema}.musubi_replays (node_id, replays, last_at) VALUES (%s, 1, 0) "
    "ON CONFLICT (node_id) DO UPDATE SET replays = {schema}.musubi_replays.replays + 1"
)


def _deadlock_once(pg_dsn: str, schema: str, store: PostgresStore) -> BaseException | None:
    """Make PostgreSQL abort the store's add_replays as a deadlock, once, for real.

    Another session locks row ``b``; the store's transaction locks ``a`` and waits for ``b``;
    the session then asks for ``a``. The store's session waited first, so its deadlock check
    runs first (the session's is set far later) and PostgreSQL aborts the store's transaction.
    Returns what add_replays raised, if anything.
    """
    outcome: list[BaseException | None] = []

    def replays() -> None:
        try:
            store.add_replays({"a" * 64: 1, "b" * 64: 1}, 0.0)
            outcome.append(None)
        except BaseException as exc:  # handed to the test
            outcome.append(exc)

    with psycopg.connect(pg_dsn) as other:
        other.execute("SET deadlock_timeout = '10min'")
        other.execute(_COUNT_ONE.format(schema=schema), ("b" * 64,))
        thread = threading.Thread(target=replays)
        thread.start()
        with psycopg.connect(pg_dsn, autocommit=True) as watcher:
            while not watcher.execute(
                "SELECT 1 FROM pg_locks WHERE NOT granted AND pid != %s", (other.info.backend_pid,)
            ).fetchone():
                threading.Event().wait(0.01)
        other.execute(_COUNT_ONE.format(schema=schema), ("a" * 64,))
        other.commit()
    thread.join()
    return outcome[0]


def test_a_deadlocked_write_is_retried(pg_dsn: str) -> None:
    schema = f"r{uuid.uuid4().hex[:8]}"
    with PostgresStore(pg_dsn, schema=schema) as store:
        store.write([NodeWrite(n * 64, "op", "op", "step", "deterministic", n, "done") for n in "ab"])
        assert _deadlock_once(pg_dsn, schema, store) is None
        assert store.retries == 1
        assert [store.get_node(n * 64).replay_count for n in "ab"] == [2, 2]  # type: ignore[union-attr]


def test_retries_are_bounded(pg_dsn: str, monkeypatch: Any) -> None:
    import musubi_core.store.postgres as postgres

    monkeypatch.setattr(postgres, "WRITE_ATTEMPTS", 1)
    schema = f"r{uuid.uuid4().hex[:8]}"
    with PostgresStore(pg_dsn, schema=schema) as store:
        store.write([NodeWrite(n * 64, "op", "op", "step", "deterministic", n, "done") for n in "ab"])
        raised = _deadlock_once(pg_dsn, schema, store)
        assert isinstance(raised, StoreError), raised
        assert "deadlock 1 times in a row" in str(raised) and "fewer" in str(raised)
        assert [store.get_node(n * 64).replay_count for n in "ab"] == [1, 1]  # type: ignore[union-attr]
