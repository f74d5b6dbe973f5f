"""Every replay path probes through the engine's hit memo (``Engine.hits``): a ``@step`` hit
read again while the store file is unchanged runs no SQL, any commit (another process's
invalidation included) is seen at the next call, a memo holds at most its byte budget, and a
caller's TTL is never answered with a hit remembered under a looser one. Real SQLite files,
the store's own connection traced, a real second process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from musubi_core import SQLiteStore, step
from musubi_core.engine import Engine
from musubi_core.fastpath import HitMemo
from musubi_core.policy import StepConfiguration, StepType
from musubi_core.probe import EncodedHit


def _probes(engine: Engine) -> list[str]:
    """The statements this thread's store connection runs that read a node, from now on."""
    statements: list[str] = []
    conn = engine.store._conn()  # type: ignore[attr-defined]
    conn.set_trace_callback(
        lambda sql: statements.append(sql) if "FROM musubi_nodes" in sql else None
    )
    return statements


def test_a_step_replayed_again_runs_no_sql_until_another_process_invalidates(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "m.db")
    engine = Engine(SQLiteStore(path))
    runs: list[int] = []

    @step(engine=engine, name="demo.double")
    def double(x: int) -> int:
        runs.append(x)
        return 2 * x

    first = double(21)
    engine.flush()  # committed: the replays below read the file
    probes = _probes(engine)
    assert double(21).replayed and double(21).replayed and runs == [21]
    # The first two replays read the node (a hit is kept when it is asked for again) ...
    assert len(probes) == 2
    for _ in range(4):
        again = double(21)
        assert again.replayed and again.value == 42
    assert len(probes) == 2  # ... the next four were served from the memo
    assert engine.hits is engine.hits  # one memo per engine

    script = (
        "import sys\n"
        "from musubi_core import SQLiteStore\n"
        "from musubi_core.engine import Engine\n"
        "e = Engine(SQLiteStore(sys.argv[1]))\n"
        "print(e.invalidate(sys.argv[2]))\n"
        "e.close()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, path, first.node_id],
        check=True, capture_output=True, text=True,
    )
    assert out.stdout.strip() == "1"
    again = double(21)
    assert not again.replayed and runs == [21, 21]  # the other process's commit was seen
    engine.flush()
    assert engine.store.get_node(first.node_id).replay_count == 6  # every replay counted
    engine.close()


def test_a_memo_remembers_no_more_than_its_byte_budget(tmp_path: Path) -> None:
    engine = Engine(SQLiteStore(str(tmp_path / "m.db")))
    small = engine.key("demo.small", {"a": 1})
    big = engine.key("demo.big", {"a": 1})
    engine.record(small, "x" * 100)
    engine.record(big, "y" * 5000)
    memo = HitMemo(engine, max_memo_bytes=1000)
    probes = _probes(engine)
    for _ in range(3):
        assert isinstance(memo.probe(small), EncodedHit)
        hit = memo.probe(big)
        assert isinstance(hit, EncodedHit) and len(hit.payload) > 1000
    # The small hit was read twice (kept when asked for again); the big one every time.
    assert len(probes) == 5
    memo.close()
    engine.close()


def test_a_shorter_ttl_is_never_answered_with_a_hit_remembered_under_a_longer_one(
    tmp_path: Path,
) -> None:
    engine = Engine(SQLiteStore(str(tmp_path / "m.db")))
    long_ttl = StepConfiguration(step_type=StepType.STOCHASTIC, ttl_seconds=3600)
    short_ttl = StepConfiguration(step_type=StepType.STOCHASTIC, ttl_seconds=0.05)
    key = engine.key("demo.sample", {"prompt": "hi"})
    engine.record(key, "sampled", long_ttl)
    time.sleep(0.1)  # older than the short TTL
    memo = engine.hits
    assert isinstance(memo.probe(key, long_ttl), EncodedHit)
    assert isinstance(memo.probe(key, long_ttl), EncodedHit)  # remembered
    assert memo.probe(key, short_ttl) is None  # expired for this caller: the lookup decides
    assert engine.lookup(key, short_ttl).replay is False
    assert engine.lookup(key, long_ttl).replay is True
    engine.close()


def test_every_replay_gets_a_value_of_its_own(tmp_path: Path) -> None:
    engine = Engine(SQLiteStore(str(tmp_path / "m.db")))

    @step(engine=engine, name="demo.flat")
    def flat(x: int) -> dict[str, object]:
        return {"x": x, "label": "flat", "ratio": 0.5, "ok": True, "none": None}

    @step(engine=engine, name="demo.nested")
    def nested(x: int) -> dict[str, object]:
        return {"x": x, "items": [1, 2, {"deep": "yes"}]}

    @step(engine=engine, name="demo.listed")
    def listed(x: int) -> list[int]:
        return [x, x + 1]

    for fn, expected in (
        (flat, {"x": 1, "label": "flat", "ratio": 0.5, "ok": True, "none": None}),
        (nested, {"x": 1, "items": [1, 2, {"deep": "yes"}]}),
        (listed, [1, 2]),
    ):
        fn(1)
        engine.flush()
        values = []
        for _ in range(5):  # replays; all but the first are served from the memo
            got = fn(1)
            assert got.replayed and got.value == expected
            assert all(got.value is not seen for seen in values)
            values.append(got.value)
            # What one caller does to its value reaches no other caller.
            if isinstance(got.value, dict):
                got.value["x"] = "mutated by the caller"
                if "items" in got.value:
                    got.value["items"][2]["deep"] = "mutated"
            else:
                got.value.append("mutated")
    engine.close()


def test_an_entry_read_once_leaves_nothing_in_the_memos(tmp_path: Path) -> None:
    """The next run of an application reads each entry once: the memos keep an answer only
    when it is asked for again, so such a run leaves nothing in them for the garbage
    collector to walk."""
    path = str(tmp_path / "m.db")
    writer, reader = Engine(SQLiteStore(path)), Engine(SQLiteStore(path))

    def make(engine: Engine) -> Any:
        @step(engine=engine, name="demo.summary")
        def summary(doc: int) -> dict[str, object]:
            return {"doc": doc, "text": f"document {doc}"}

        return summary

    write, read = make(writer), make(reader)
    for doc in range(50):
        write(doc)
    writer.flush()
    assert all(read(doc).replayed for doc in range(50))
    hits = reader.hits
    assert not hits._local.memo and not hits._values and not hits._checked
    assert not read._keys
    assert all(read(doc).replayed for doc in range(50))  # asked again: now kept
    # (The hits themselves too, unless a commit of the replay counts moved the change token
    # between the two rounds: that is not asserted.)
    assert len(read._keys) == 50 and len(hits._values) == 50 and len(hits._checked) == 50
    reader.close()
    writer.close()
