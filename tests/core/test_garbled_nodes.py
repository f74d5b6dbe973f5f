"""A node row garbled by hand or by damage (text in a timestamp, a counter that is not a
number): a replay becomes a miss with a warning, other reads a clear CorruptNodeError, the CLI
an error message (exit 1, no traceback), and `musubi check` lists the row."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from musubi_core import CorruptNodeError, Engine, ReplayReason, SQLiteStore, step, use_engine
from tests.core.conftest import subprocess_env

CALLS: list[int] = []

# Column, the SQL value written into it: text where a number belongs, a blob, a float count.
GARBLES = [
    ("expires_at", "'garbage'"),
    ("finished_at", "'noon'"),
    ("created_at", "'yesterday'"),
    ("replay_count", "'many'"),
    ("tokens_in", "x'00ff'"),
    ("duration_s", "'slow'"),
]


@step(name="garbled.square")
def square(x: int) -> int:
    CALLS.append(x)
    return x * x


def _recorded(db: Path) -> str:
    """A store holding square(3); its node id."""
    with Engine(SQLiteStore(db)) as engine, use_engine(engine):
        node_id = square(3).node_id
    CALLS.clear()
    return node_id


def _garble(db: Path, node_id: str, column: str, value: str) -> None:
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(f"UPDATE musubi_nodes SET {column} = {value} WHERE node_id = ?", (node_id,))
    conn.close()


@pytest.mark.parametrize(("column", "value"), GARBLES, ids=[g[0] for g in GARBLES])
def test_a_garbled_node_is_a_miss_with_a_warning_and_heals(
    tmp_path: Path, column: str, value: str
) -> None:
    db = tmp_path / "musubi.db"
    node_id = _recorded(db)
    _garble(db, node_id, column, value)
    with Engine(SQLiteStore(db)) as engine, use_engine(engine):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            looked = engine.lookup(square.key(3)[0])
            first = square(3)
        assert first.value == 9 and not first.replayed and CALLS == [3]  # the step ran
        assert not looked.replay and looked.decision.reason is ReplayReason.NODE_CORRUPT
        messages = [str(w.message) for w in caught]
        assert len(messages) == 2 and messages[0] == messages[1]  # one for each lookup
        assert column in messages[0] and node_id[:16] in messages[0]
        assert "musubi" in messages[0] and "check" in messages[0]
        assert square(3).replayed  # the new record rewrote the row
        assert CALLS == [3]
    with SQLiteStore(db) as store:
        assert store.check() == []


def test_reads_raise_a_corrupt_node_error_naming_node_and_column(tmp_path: Path) -> None:
    db = tmp_path / "musubi.db"
    node_id = _recorded(db)
    _garble(db, node_id, "expires_at", "'garbage'")
    with SQLiteStore(db) as store:
        for read in (
            lambda: store.get_node(node_id),
            lambda: store.get_node_and_artifact(node_id),
            lambda: store.list_nodes(),
            lambda: store.lineage(node_id),
            lambda: store.nodes_of_op("garbled.square"),
        ):
            with pytest.raises(CorruptNodeError) as raised:
                read()
            assert raised.value.node_id == node_id and raised.value.column == "expires_at"
            assert raised.value.value == "garbage" and str(db) in str(raised.value)
        assert store.stats()["nodes"] == 1  # aggregates still read


def _musubi(db: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "musubi_core.cli", "--db", str(db), *argv],
        capture_output=True, text=True, env=subprocess_env(), timeout=120,
    )


def test_cli_reports_a_garbled_node_without_a_traceback(tmp_path: Path) -> None:
    db = tmp_path / "musubi.db"
    node_id = _recorded(db)
    _garble(db, node_id, "expires_at", "'garbage'")
    for argv in (["explain", node_id[:10]], ["show", node_id[:10]], ["lineage", node_id[:10]]):
        done = _musubi(db, *argv)
        assert done.returncode == 1, (argv, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr, done.stderr
        assert "expires_at" in done.stderr and node_id[:16] in done.stderr
        assert f"musubi --db {db} check" in done.stderr
    checked = _musubi(db, "check")
    assert checked.returncode == 1 and "Traceback" not in checked.stderr
    assert f"node {node_id} has an unreadable expires_at ('garbage')" in checked.stdout
    assert _musubi(db, "stats").returncode == 0
