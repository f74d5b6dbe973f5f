"""Eight processes writing one store at once (WAL, BEGIN IMMEDIATE, busy_timeout)."""

from __future__ import annotations

import itertools
import multiprocessing as mp
import pathlib
import sqlite3
from typing import Any

from _env import Env
from _harness import Comparison, Ratio, Variant

from musubi_core import Engine, SQLiteStore

WORKERS = 8


def _musubi_worker(path: str, tag: str, count: int) -> None:
    engine = Engine(SQLiteStore(path))
    for i in range(count):
        key = engine.key("bench.concurrent", {"tag": tag, "i": i})
        engine.record(key, {"tag": tag, "i": i, "text": "result " * 4})
    engine.close()


def _sqlite_worker(path: str, tag: str, count: int) -> None:
    conn = sqlite3.connect(path, isolation_level=None, timeout=60)
    conn.execute("PRAGMA synchronous = NORMAL")
    for i in range(count):
        conn.execute("INSERT INTO kv VALUES (?, ?)", (f"{tag}-{i}", b"x" * 64))
    conn.close()


def _spawn(target: Any, path: pathlib.Path, workers: int, count: int, round_tag: str) -> None:
    ctx = mp.get_context("fork")
    procs = [
        ctx.Process(target=target, args=(str(path), f"{round_tag}-{w}", count))
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    codes = [p.exitcode for p in procs]
    assert codes == [0] * workers, f"a writer process failed: exit codes {codes}"


def eight_writers(env: Env) -> Comparison:
    per_worker = env.pick(25, 250)
    total = WORKERS * per_worker
    mpath = env.path("concurrent.db")
    Engine(SQLiteStore(mpath)).close()  # create the schema once, before the race
    spath = env.path("concurrent-floor.db")
    floor = sqlite3.connect(spath, isolation_level=None)
    floor.execute("PRAGMA journal_mode = WAL")
    floor.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v BLOB) WITHOUT ROWID")
    rounds = itertools.count()
    probe = sqlite3.connect(mpath, isolation_level=None)
    expected = {"musubi": 0, "floor": 0}

    def musubi(workers: int) -> Any:
        def op() -> None:
            n = total // workers
            _spawn(_musubi_worker, mpath, workers, n, f"m{next(rounds)}")

        return op

    def check_musubi(_n: int) -> None:
        expected["musubi"] += total
        nodes = probe.execute("SELECT COUNT(*) FROM musubi_nodes").fetchone()[0]
        assert nodes == expected["musubi"], f"{nodes} nodes stored, expected {expected['musubi']}"

    def check_floor(_n: int) -> None:
        expected["floor"] += total
        rows = floor.execute("SELECT COUNT(*) FROM kv").fetchone()[0]
        assert rows == expected["floor"], f"{rows} rows stored, expected {expected['floor']}"

    # The warm-up block of the harness also writes: account for it via a setup probe.
    def resync() -> None:
        expected["musubi"] = probe.execute("SELECT COUNT(*) FROM musubi_nodes").fetchone()[0]
        expected["floor"] = floor.execute("SELECT COUNT(*) FROM kv").fetchone()[0]

    return Comparison(
        "eight_writers",
        f"{WORKERS} processes writing one store at once ({total} entries per block, incl. process start)",
        [
            Variant(
                f"musubi, {WORKERS} processes",
                musubi(WORKERS),
                setup=resync,
                check=check_musubi,
                units=total,
                note="engine.record, one transaction per entry",
            ),
            Variant(
                "musubi, 1 process",
                musubi(1),
                setup=resync,
                check=check_musubi,
                units=total,
                note="same entries, one writer",
            ),
            Variant(
                f"sqlite3 INSERT, {WORKERS} processes",
                lambda: _spawn(_sqlite_worker, spath, WORKERS, per_worker, f"s{next(rounds)}"),
                setup=resync,
                check=check_floor,
                units=total,
                note="bare autocommit INSERT, WAL",
            ),
        ],
        [
            Ratio(
                f"musubi {WORKERS} procs / 1 proc",
                f"musubi, {WORKERS} processes",
                "musubi, 1 process",
            ),
            Ratio(
                f"musubi / sqlite3, {WORKERS} procs",
                f"musubi, {WORKERS} processes",
                f"sqlite3 INSERT, {WORKERS} processes",
            ),
        ],
        ops_per_block=1,
        rounds=env.pick(2, 7),
        unit="entry",
    )


CASES = [eight_writers]
