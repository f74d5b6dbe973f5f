"""Behaviour across real processes: replay, a SIGKILLed external effect,
single-flight effects, concurrent writers, fork safety."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from musubi_core import (
    EffectInDoubtError,
    Engine,
    ReplayReason,
    SQLiteStore,
    StepConfiguration,
    StepType,
    step,
    use_engine,
)

PIPELINE = """
    import json, sys
    from musubi_core import Engine, Result, SQLiteStore, StepConfiguration, StepType
    from musubi_core import merge, step, use_engine

    executed = []

    @step()
    def extract(text: str) -> dict:
        executed.append("extract")
        return {"facts": text.split(), "n": (1, 2.0, b"x")}

    @step(semantics=StepConfiguration(step_type=StepType.STOCHASTIC, ttl_seconds=3600))
    def summarize(facts: Result[dict]) -> str:
        executed.append("summarize")
        return " ".join(facts.value["facts"][:2])

    @step(step_type=StepType.EXTERNAL_EFFECT)
    def publish(summary: Result[str], channel: str) -> dict:
        executed.append("publish")
        return {"posted": summary.value, "channel": channel}

    with Engine(SQLiteStore(sys.argv[1])) as engine, use_engine(engine):
        facts = extract("musubi remembers every expensive step")
        with merge(facts):
            summary = summarize(facts)
        post = publish(summary, "#general")
        out = {
            "executed": executed,
            "replayed": [r.replayed for r in (facts, summary, post)],
            "nodes": [r.node_id for r in (facts, summary, post)],
            "value": post.value,
            "tuple_kept": facts.value["n"] == (1, 2.0, b"x"),
        }
    print(json.dumps(out))
"""


def test_replay_across_processes(run_py: Any, parse_json: Any, db_path: Path) -> None:
    first = parse_json(run_py(PIPELINE, str(db_path)))
    second = parse_json(run_py(PIPELINE, str(db_path)))
    assert first["executed"] == ["extract", "summarize", "publish"]
    assert first["replayed"] == [False, False, False]
    assert second["executed"] == []
    assert second["replayed"] == [True, True, True]
    assert second["nodes"] == first["nodes"]
    assert second["value"] == first["value"] == {
        "posted": "musubi remembers", "channel": "#general",
    }
    assert second["tuple_kept"] is True
    with SQLiteStore(db_path) as store:
        stats = store.stats()
    assert (stats["nodes"], stats["executions"], stats["replays"]) == (3, 3, 3)


EFFECT = """
    import json, os, sys, time
    from pathlib import Path
    from musubi_core import Engine, SQLiteStore, StepConfiguration, StepType, step, use_engine

    db, workdir, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]

    @step(name="payments.charge", version="1",
          semantics=StepConfiguration(step_type=StepType.EXTERNAL_EFFECT))
    def charge(customer: str, cents: int) -> dict:
        with open(workdir / "effects.log", "a") as log:
            log.write(f"{os.getpid()} charged {customer} {cents}\\n")
        (workdir / f"inside-{os.getpid()}").touch()
        if mode == "hang":
            time.sleep(120)
        time.sleep(float(mode))
        return {"charged": cents, "by": os.getpid()}

    while not (workdir / "go").exists():
        time.sleep(0.01)
    with Engine(SQLiteStore(db)) as engine, use_engine(engine):
        result = charge("cus_1", 500)
    print(json.dumps({"value": result.value, "replayed": result.replayed,
                      "node": result.node_id}))
"""


def _spawn(tmp_path: Path, code: str, *args: str, make_env: Any) -> subprocess.Popen[str]:
    import textwrap

    script = tmp_path / "effect_script.py"
    if not script.exists():
        script.write_text(textwrap.dedent(code))
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        cwd=tmp_path,
        env=make_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def _charge_steps() -> tuple[Any, Any]:
    calls: Counter[str] = Counter()

    @step(name="payments.charge", version="1",
          semantics=StepConfiguration(step_type=StepType.EXTERNAL_EFFECT))
    def charge(customer: str, cents: int) -> dict[str, Any]:
        calls["charge"] += 1
        return {"charged": cents, "by": "parent"}

    @step(name="payments.charge", version="1",
          semantics=StepConfiguration(step_type=StepType.EXTERNAL_EFFECT, force_reexecution=True))
    def charge_forced(customer: str, cents: int) -> dict[str, Any]:
        calls["charge"] += 1
        return {"charged": cents, "by": "parent"}

    charge.calls = calls  # type: ignore[attr-defined]
    return charge, charge_forced


def test_sigkilled_external_effect_is_in_doubt_until_forced(
    tmp_path: Path, db_path: Path, make_env: Any
) -> None:
    (tmp_path / "go").touch()
    proc = _spawn(tmp_path, EFFECT, str(db_path), str(tmp_path), "hang", make_env=make_env)
    try:
        _wait_for(lambda: (tmp_path / f"inside-{proc.pid}").exists())
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / "effects.log").read_text().count("charged") == 1

    # The intent row survived the crash: the node is pending, owned by the dead pid.
    with sqlite3.connect(db_path) as raw:
        rows = raw.execute("SELECT status, owner, exec_count FROM musubi_nodes").fetchall()
    assert len(rows) == 1
    status, owner, exec_count = rows[0]
    assert status == "pending" and f":{proc.pid}:" in owner and exec_count == 0

    charge, charge_forced = _charge_steps()
    with Engine(SQLiteStore(db_path)) as engine, use_engine(engine):
        assert charge.explain("cus_1", 500).reason is ReplayReason.EFFECT_IN_DOUBT
        assert any("pending" in p for p in engine.store.check())
        for _ in range(2):  # it keeps raising: never silently repeated
            with pytest.raises(EffectInDoubtError) as raised:
                charge("cus_1", 500)
            assert "force_reexecution=True" in str(raised.value)
            assert raised.value.node_id == charge.key("cus_1", 500)[0].node_id
        assert charge.calls["charge"] == 0
        forced = charge_forced("cus_1", 500)
        assert not forced.replayed and forced.value == {"charged": 500, "by": "parent"}
        replay = charge("cus_1", 500)
        assert replay.replayed and replay.value == forced.value
        assert charge.calls["charge"] == 1
        record = engine.store.get_node(forced.node_id)
        assert record is not None and record.status == "done" and record.exec_count == 1
        assert engine.store.check() == []


def test_two_processes_execute_a_missing_effect_once(
    tmp_path: Path, db_path: Path, make_env: Any
) -> None:
    SQLiteStore(db_path).close()  # create the schema up front
    procs = [
        _spawn(tmp_path, EFFECT, str(db_path), str(tmp_path), "1.0", make_env=make_env)
        for _ in range(2)
    ]
    time.sleep(0.3)  # both interpreters are up and polling for "go"
    (tmp_path / "go").touch()
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    log = (tmp_path / "effects.log").read_text().splitlines()
    assert len(log) == 1, log
    assert outputs[0]["value"] == outputs[1]["value"]
    assert outputs[0]["node"] == outputs[1]["node"]
    assert sorted(o["replayed"] for o in outputs) == [False, True]
    with SQLiteStore(db_path) as store:
        record = store.get_node(outputs[0]["node"])
    assert record is not None and record.exec_count == 1 and record.replay_count == 1


WRITER = """
    import json, sys, time
    from pathlib import Path
    from musubi_core import Engine, SQLiteStore, step, use_engine

    db, worker, go = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])

    @step(name="load.write")
    def work(worker: int, i: int) -> dict:
        return {"worker": worker, "i": i, "text": "x" * 200}

    @step(name="load.shared")
    def shared(i: int) -> int:
        return i * i

    while not go.exists():
        time.sleep(0.01)
    written = 0
    with Engine(SQLiteStore(db)) as engine, use_engine(engine):
        for i in range(300):
            written += not work(worker, i).replayed
            if i % 15 == 0:
                shared(i)  # every worker also writes the same 20 nodes
    print(json.dumps({"written": written}))
"""


def test_four_processes_writing_at_once_lose_nothing(
    tmp_path: Path, db_path: Path, make_env: Any
) -> None:
    import textwrap

    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(WRITER))
    go = tmp_path / "go"
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(db_path), str(w), str(go)],
            cwd=tmp_path, env=make_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(4)
    ]
    time.sleep(0.3)
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "locked" not in err.lower() and "busy" not in err.lower(), err
        results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"4 writers x 300 nodes: {time.perf_counter() - started:.2f}s")
    assert [r["written"] for r in results] == [300] * 4
    with sqlite3.connect(db_path) as raw:
        by_op = dict(raw.execute("SELECT op_name, COUNT(*) FROM musubi_nodes GROUP BY op_name"))
        statuses = dict(raw.execute("SELECT status, COUNT(*) FROM musubi_nodes GROUP BY status"))
        worker_execs = raw.execute(
            "SELECT SUM(exec_count) FROM musubi_nodes WHERE op_name = 'load.write'"
        ).fetchone()[0]
        artifacts = raw.execute("SELECT COUNT(*) FROM musubi_artifacts").fetchone()[0]
    assert by_op == {"load.write": 1200, "load.shared": 20}
    assert statuses == {"done": 1220}
    assert worker_execs == 1200
    assert artifacts == 1220


def _forked_writer(path: str, n: int) -> None:
    engine = _FORK_ENGINE
    assert engine is not None

    @step(name="fork.child")
    def child(i: int) -> int:
        return i

    with use_engine(engine):
        for i in range(n):
            child(i)
    engine.flush()


_FORK_ENGINE: Engine | None = None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_store_is_fork_safe(db_path: Path) -> None:
    """A child forked while the parent holds an open store gets its own
    connection; both keep writing."""
    global _FORK_ENGINE

    @step(name="fork.parent")
    def parent(i: int) -> int:
        return i

    engine = Engine(SQLiteStore(db_path))
    _FORK_ENGINE = engine
    try:
        with use_engine(engine):
            parent(-1)
            ctx = multiprocessing.get_context("fork")
            children = [ctx.Process(target=_forked_writer, args=(str(db_path), 50)) for _ in range(2)]
            for proc in children:
                proc.start()
            for i in range(50):
                parent(i)
            for proc in children:
                proc.join(60)
                assert proc.exitcode == 0
            assert parent(-1).replayed
        engine.flush()
        counts = dict(
            engine.store.query(  # type: ignore[attr-defined]
                lambda c: c.execute(
                    "SELECT op_name, COUNT(*) FROM musubi_nodes GROUP BY op_name"
                ).fetchall()
            )
        )
    finally:
        _FORK_ENGINE = None
        engine.close()
    assert counts == {"fork.parent": 51, "fork.child": 50}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_uses_the_parents_connection(db_path: Path) -> None:
    """The store tells a forked child by a process id kept current across fork (no system
    call per lookup): the child's first statement opens a connection of its own, and the
    parent's stays open and usable."""
    store = SQLiteStore(db_path)
    try:
        parent_conn = store._conn()
        parent_conn.execute("SELECT 1").fetchone()
        pid = os.fork()
        if pid == 0:  # the child: exit code 0 only with a connection of its own that works
            code = 1
            try:
                child_conn = store._conn()
                ok = child_conn is not parent_conn and child_conn.execute("SELECT 1").fetchone()
                code = 0 if ok == (1,) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert store._conn() is parent_conn
        assert parent_conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        store.close()
