"""HitMemo reads the store's change token through a read-only map of the ``-shm`` file once
this process holds that file: it still sees every commit of another process, the map is closed
before the store's connections, and a forked child never reads through the parent's map.
Real SQLite files and real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from musubi_core import SQLiteStore
from musubi_core.engine import Engine
from musubi_core.fastpath import HitMemo
from musubi_core.probe import EncodedHit
from tests.support.forking import in_forked_child

pytestmark = pytest.mark.skipif(os.name != "posix", reason="fork and the -shm map: POSIX")


def _memo(tmp_path: Path) -> tuple[Engine, HitMemo, object]:
    engine = Engine(SQLiteStore(str(tmp_path / "m.db")))
    key = engine.key("op", {"a": 1})
    engine.record(key, "v")
    memo = HitMemo(engine)
    assert isinstance(memo.probe(key), EncodedHit)
    return engine, memo, key


def test_the_token_is_read_through_the_map_and_sees_another_processs_commit(tmp_path: Path) -> None:
    engine, memo, key = _memo(tmp_path)
    assert memo._map is not None  # this process read the store: the header is mapped
    first = memo.probe(key)  # type: ignore[arg-type]
    assert memo.probe(key) is first  # type: ignore[arg-type]  # remembered: file unchanged
    script = (
        "import sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1])\n"
        "c.execute(\"UPDATE musubi_nodes SET status = 'stale', stale_cause = 'invalidated'\")\n"
        "c.commit()\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "m.db")], check=True)
    assert memo.probe(key) is None  # type: ignore[arg-type]  # the commit moved the token
    assert engine.lookup(key).replay is False  # type: ignore[arg-type]
    memo.close()
    engine.close()


def test_closing_the_store_closes_the_map_first(tmp_path: Path) -> None:
    engine, memo, _key = _memo(tmp_path)
    view = memo._map
    assert view is not None
    engine.close()
    assert memo._map is None and view.closed
    memo.close()


def test_a_forked_child_reads_the_token_without_the_parents_map(tmp_path: Path) -> None:
    engine, memo, key = _memo(tmp_path)
    assert memo._map is not None

    def child() -> int:
        if memo._map is not None:
            return 3
        return 0 if isinstance(memo.probe(key), EncodedHit) else 4  # type: ignore[arg-type]

    assert in_forked_child(child) == 0
    assert memo._map is not None  # the parent keeps its own
    assert isinstance(memo.probe(key), EncodedHit)  # type: ignore[arg-type]
    memo.close()
    engine.close()
