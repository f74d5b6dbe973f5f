"""A store on a read-only file, folder or mount: replays are served, nothing is recorded
(one warning), every read command works, and a direct write is a ReadOnlyStoreError."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from musubi_core import (
    Engine,
    ReadOnlyStoreError,
    SQLiteStore,
    StoreError,
    run,
    step,
    use_engine,
)
from musubi_core.store import NodeWrite
from tests.core.conftest import subprocess_env
from tests.support.read_only import HOW, read_only_store


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


CALLS: list[str] = []


@step(name="ro.double")
def double(x: int) -> int:
    CALLS.append(f"double({x})")
    return 2 * x


def _populated(db: Path) -> None:
    """A store holding a replayable step and a durable run, closed cleanly."""
    with Engine(SQLiteStore(db)) as engine, use_engine(engine):
        double(1)
    run(db, lambda ctx: ctx.step("one", lambda: 1), run_id="job")
    CALLS.clear()


@pytest.mark.parametrize("how", HOW)
def test_replays_are_served_and_nothing_is_recorded_with_one_warning(
    tmp_path: Path, how: str
) -> None:
    db = tmp_path / "store" / "musubi.db"
    db.parent.mkdir()
    _populated(db)
    with SQLiteStore(db) as store:
        nodes = store.stats()["nodes"]
    before = _digest(db.parent)
    with read_only_store(db, how) as ro:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with Engine(SQLiteStore(ro)) as engine, use_engine(engine):
                assert engine.store.read_only  # type: ignore[attr-defined]
                first = double(1)
                assert first.replayed and first.value == 2
                assert double(2).value == 4  # computed; could not be stored
                assert not double(2).replayed  # so computed again
                assert engine.store.stats()["nodes"] == nodes
                with pytest.raises(ReadOnlyStoreError) as raised:
                    engine.store.write([NodeWrite("n" * 64, "op", "op", "step", "deterministic", "h", "done")])
            for run_id in ("job", "new-job"):  # a durable run needs a writable store
                with pytest.raises(StoreError):
                    run(ro, lambda ctx: ctx.step("two", lambda: 2), run_id=run_id)
        ours = [w for w in caught if "read-only" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        assert CALLS == ["double(2)", "double(2)"]
        message = str(raised.value)
        assert str(ro) in message and "writable" in message and "backup" in message
    assert _digest(db.parent) == before  # not one byte changed


# Runs several `musubi` commands in one fresh interpreter (one import instead of one per
# command): exit code, stdout and stderr of each, a traceback if one escaped main().
_DRIVER = """
import contextlib, io, json, sys, traceback
from musubi_core.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            traceback.print_exc()
            code = -1
    results.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def musubi(db: Path, *commands: list[str]) -> list[tuple[int, str, str]]:
    argvs = [["--db", str(db), *argv] for argv in commands]
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(argvs)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return [tuple(r) for r in json.loads(done.stdout)]


@pytest.mark.parametrize("how", HOW)
def test_cli_read_commands_work_on_a_read_only_store(tmp_path: Path, how: str) -> None:
    db = tmp_path / "store" / "musubi.db"
    db.parent.mkdir()
    _populated(db)
    with SQLiteStore(db) as store:
        node = next(n for n in store.list_nodes() if n.op_name == "ro.double")
    copy = tmp_path / "copy.db"
    short = node.node_id[:12]
    reads = [["stats"], ["show", short], ["lineage", short], ["explain", short], ["runs"],
             ["steps", "job"], ["check"]]
    with read_only_store(db, how) as ro:
        *answers, explained, refused, backed_up = musubi(
            ro, *[[*argv, "--json"] for argv in reads], ["explain", short],
            ["invalidate", short], ["backup", str(copy)],
        )
    for argv, (code, out, err) in zip(reads, answers, strict=True):
        assert code == 0 and "Traceback" not in err, (argv, err)
        json.loads(out)
    assert "would REPLAY" in explained[1]
    assert refused[0] == 1 and "read-only" in refused[2] and "Traceback" not in refused[2]
    assert backed_up[0] == 0, backed_up[2]
    with SQLiteStore(copy) as store:
        assert store.get_node(node.node_id) is not None
