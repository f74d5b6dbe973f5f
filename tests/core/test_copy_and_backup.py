"""Copying a store: the main file alone is complete after a clean close or a normal exit,
and ``musubi backup`` takes a consistent copy while another process keeps writing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

from musubi_core import Engine, SQLiteStore
from tests.core.conftest import subprocess_env

# Keeps a plain sqlite3 connection to the store open (as a notebook, a server or a `musubi`
# command in another terminal would) until its stdin closes.
HOLDER = textwrap.dedent(
    """
    import sqlite3, sys
    conn = sqlite3.connect(sys.argv[1])
    conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    print("open", flush=True)
    sys.stdin.read()
    """
)

# Writes node i, its artifact and the data edge (i-1 -> i) in one transaction each, in order,
# until the stop file appears; says "started" after 50 and finally how many it wrote.
WRITER = textwrap.dedent(
    """
    import hashlib, os, sys
    from musubi_core.store import ArtifactWrite, EdgeWrite, NodeWrite, SQLiteStore
    db, stop = sys.argv[1], sys.argv[2]
    ids = lambda i: hashlib.sha256(str(i).encode()).hexdigest()
    with SQLiteStore(db) as store:
        i = 0
        while not os.path.exists(stop) or i < 50:
            node = NodeWrite(ids(i), "w", "w", "step", "deterministic", str(i), "done", "a" + ids(i))
            edges = [EdgeWrite(ids(i - 1), ids(i))] if i else []
            store.write([node], [ArtifactWrite("a" + ids(i), "json", b"%d" % i, ids(i))], edges)
            i += 1
            if i == 50:
                print("started", flush=True)
    print(i, flush=True)
    """
)


def _rows(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM musubi_nodes").fetchone()[0])
    finally:
        conn.close()


def _main_file_only(db: Path, folder: Path) -> Path:
    """A copy of the main file alone, as `cp musubi.db` or a file sync would make it."""
    folder.mkdir()
    shutil.copyfile(db, folder / db.name)
    return folder / db.name


@contextlib.contextmanager
def _held_open(db: Path) -> Iterator[None]:
    """Another process keeps a connection to the store while the block runs (so SQLite's own
    checkpoint, made when the last connection closes, does not happen)."""
    SQLiteStore(db).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        yield
    finally:
        holder.communicate("")


def test_a_closed_store_leaves_every_row_in_the_main_file(tmp_path: Path) -> None:
    db = tmp_path / "musubi.db"
    with _held_open(db):
        engine = Engine(SQLiteStore(db))
        for i in range(60):
            engine.record(engine.key("copy.step", i), {"i": i})
        engine.close()
        copy = _main_file_only(db, tmp_path / "copy")
    assert _rows(copy) == 60
    with Engine(SQLiteStore(copy)) as engine:
        assert engine.lookup(engine.key("copy.step", 59)).value == {"i": 59}


def test_a_program_that_never_closes_its_store_leaves_every_row_in_the_main_file(
    tmp_path: Path,
) -> None:
    db = tmp_path / ".musubi" / "musubi.db"
    db.parent.mkdir()
    program = textwrap.dedent(
        """
        from musubi_core import step

        @step(name="exit.step")
        def f(i: int) -> int:
            return i * i

        for i in range(40):
            f(i)
        """
    )
    with _held_open(db):
        done = subprocess.run(
            [sys.executable, "-c", program], cwd=tmp_path, env=subprocess_env(),
            capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stderr
        copy = _main_file_only(db, tmp_path / "copy")
    assert _rows(copy) == 40


def test_backup_while_another_process_writes_is_one_consistent_snapshot(tmp_path: Path) -> None:
    db, stop, dest = tmp_path / "musubi.db", tmp_path / "stop", tmp_path / "backup" / "b.db"
    SQLiteStore(db).close()
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db), str(stop)], stdout=subprocess.PIPE, text=True,
        env=subprocess_env(),
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "started"
        backup = subprocess.run(
            [sys.executable, "-m", "musubi_core.cli", "--db", str(db), "backup", str(dest),
             "--json"],
            capture_output=True, text=True, env=subprocess_env(), timeout=120,
        )
    finally:
        stop.touch()
        written = int(writer.communicate(timeout=120)[0].strip())
    assert backup.returncode == 0, backup.stderr
    report = json.loads(backup.stdout)
    assert report["path"] == str(dest) and report["nodes"] == _rows(dest)

    conn = sqlite3.connect(dest)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        kept = sorted(int(r[0]) for r in conn.execute("SELECT input_hash FROM musubi_nodes"))
        edges = conn.execute("SELECT COUNT(*) FROM musubi_edges").fetchone()[0]
    finally:
        conn.close()
    # One snapshot: exactly the first k transactions, each whole (node, artifact and edge).
    assert 50 <= len(kept) <= written and kept == list(range(len(kept)))
    assert edges == len(kept) - 1
    with SQLiteStore(dest) as store:
        assert store.check() == []
        last = hashlib.sha256(str(len(kept) - 1).encode()).hexdigest()
        assert store.get_artifact("a" + last) == ("json", str(len(kept) - 1).encode())
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".musubi-backup-")]


def _musubi(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "musubi_core.cli", *argv],
        capture_output=True, text=True, env=subprocess_env(), timeout=120,
    )


def test_backup_never_overwrites_unless_forced(tmp_path: Path) -> None:
    db, dest = tmp_path / "musubi.db", tmp_path / "b.db"
    with Engine(SQLiteStore(db)) as engine:
        engine.record(engine.key("b.step", 1), 1)
    dest.write_text("precious")
    refused = _musubi("--db", str(db), "backup", str(dest))
    assert refused.returncode == 1 and "--force" in refused.stderr
    assert "Traceback" not in refused.stderr and dest.read_text() == "precious"
    itself = _musubi("--db", str(db), "backup", str(db), "--force")
    assert itself.returncode == 1 and "the store itself" in itself.stderr
    assert _musubi("--db", str(db), "backup", str(dest), "--force").returncode == 0
    assert _rows(dest) == 1
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".musubi-backup-")]


def test_backup_of_a_postgres_store_points_to_pg_dump() -> None:
    done = _musubi("--db", "postgresql://nobody@127.0.0.1:1/musubi", "backup", "out.db")
    assert done.returncode == 1 and "pg_dump" in done.stderr and "Traceback" not in done.stderr
