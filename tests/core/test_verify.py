"""A stored output is served only if it hashes to its content id.

Artifacts are content-addressed (``artifact_id = sha256(encoding + b"\\0" + payload)``). Someone
who edits a payload in the SQLite file into another value the codec accepts must not get the
edited value replayed: every replay path checks the id first. A mismatch is a miss with one
warning, the call runs, and its record rewrites the artifact, so the next call replays the
repaired value. A committed durable step whose result was edited raises the ``DecodeError``
that says to re-run it.

Each test edits a real store file through a second connection (or the ``sqlite3`` shell).
"""

from __future__ import annotations

import shutil
import sqlite3
import warnings
from pathlib import Path
from typing import Any

import pytest

from musubi_core import DecodeError, Engine, SQLiteStore, run, step
from musubi_core.fastpath import HitMemo
from musubi_core.policy import ReplayReason
from musubi_core.probe import EncodedHit, probe_replay
from tests.support.tamper import artifact_of, edit_payload, payload_of


def _ours(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in caught if "content id" in str(w.message)]


@pytest.mark.parametrize("how", ["connection", "shell"])
def test_step_never_replays_an_edited_artifact(engine: Engine, db_path: Path, how: str) -> None:
    if how == "shell" and shutil.which("sqlite3") is None:
        pytest.skip("the sqlite3 shell is not installed")
    ran: list[str] = []

    @step
    def answer(question: str) -> dict[str, Any]:
        ran.append(question)
        return {"answer": "Tokyo", "confidence": 0.9}

    first = answer("capital of Japan?")
    engine.flush()
    original = payload_of(db_path, first.artifact_id)
    edit_payload(
        db_path, first.artifact_id, original.replace(b"Tokyo", b"Osaka"), shell=how == "shell"
    )

    key = answer.key("capital of Japan?")[0]
    decision = engine.explain(key)  # reads only: says why, warns nothing
    assert not decision.replay and decision.reason is ReplayReason.ARTIFACT_CORRUPT
    assert engine.explain_node(first.node_id)[1].reason is ReplayReason.ARTIFACT_CORRUPT

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = answer("capital of Japan?")
    assert second.value == {"answer": "Tokyo", "confidence": 0.9}  # never "Osaka"
    assert not second.replayed and ran == ["capital of Japan?"] * 2
    assert len(caught) == 1 and len(_ours(caught)) == 1
    assert issubclass(caught[0].category, RuntimeWarning)
    assert first.node_id[:12] in str(caught[0].message)

    # The recomputation rewrote the artifact: the next call replays the repaired value.
    engine.flush()
    assert payload_of(db_path, first.artifact_id) == original
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third = answer("capital of Japan?")
    assert third.replayed and third.value == {"answer": "Tokyo", "confidence": 0.9}
    assert len(ran) == 2


def test_lookup_of_an_edited_artifact_is_a_corrupt_miss(engine: Engine, db_path: Path) -> None:
    key = engine.key("demo.price", {"item": "tea"})
    engine.record(key, [1, 2, 3])
    art = artifact_of(db_path, key.node_id)
    edit_payload(db_path, art, b"[1,2,4]")
    with pytest.warns(RuntimeWarning, match="does not match its content id"):
        got = engine.lookup(key)
    assert not got.replay and got.value is None
    assert got.decision.reason is ReplayReason.ARTIFACT_CORRUPT
    engine.record(key, [1, 2, 3])
    again = engine.lookup(key)
    assert again.replay and again.value == [1, 2, 3]


def test_one_warning_per_engine(engine: Engine, db_path: Path) -> None:
    keys = [engine.key("demo.many", i) for i in range(3)]
    for i, key in enumerate(keys):
        engine.record(key, {"i": i})
    for i, key in enumerate(keys):
        edit_payload(db_path, artifact_of(db_path, key.node_id), b'{"i":%d}' % (i + 10))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        misses = [engine.lookup(key) for key in keys]
    assert [m.replay for m in misses] == [False] * 3
    assert len(_ours(caught)) == 1


@pytest.mark.parametrize("how", ["connection", "shell"])
def test_durable_step_with_an_edited_result_raises_and_reruns(tmp_path: Path, how: str) -> None:
    if how == "shell" and shutil.which("sqlite3") is None:
        pytest.skip("the sqlite3 shell is not installed")
    db = str(tmp_path / "task.db")
    ran: list[str] = []

    def fetch() -> dict[str, str]:
        ran.append("fetch")
        return {"rate": "1.00"}

    def flow(ctx: Any) -> str:
        return str(ctx.step("fetch", fetch)["rate"])

    assert run(db, flow) == "1.00"
    con = sqlite3.connect(db)
    (art,) = con.execute("SELECT artifact_id FROM musubi_run_steps WHERE name = 'fetch'").fetchone()
    con.close()
    original = payload_of(db, art)
    edit_payload(db, art, original.replace(b"1.00", b"9.99"), shell=how == "shell")

    with pytest.raises(DecodeError, match=r"rerun_from='fetch'") as info:
        run(db, flow)  # never hands the body "9.99"
    assert "content id" in str(info.value) and info.value.artifact_id == art
    assert ran == ["fetch"]

    assert run(db, flow, rerun_from="fetch") == "1.00"
    assert ran == ["fetch", "fetch"] and payload_of(db, art) == original
    assert run(db, flow) == "1.00"  # the repaired result replays
    assert ran == ["fetch", "fetch"]


def test_content_replay_never_serves_an_edited_artifact(engine: Engine, db_path: Path) -> None:
    ran: list[str] = []

    @step
    def left(x: str) -> str:
        return x.upper()

    @step
    def right(x: str) -> str:
        return x.upper()

    @step
    def shout(text: Any) -> str:
        ran.append(text.value)
        return text.value + "!"

    first = shout(left("hi"))
    engine.flush()
    original = payload_of(db_path, first.artifact_id)
    edit_payload(db_path, first.artifact_id, original.replace(b"HI!", b"NO!"))
    # Another upstream node with the same output: the same input content, served by content
    # from shout(left(...))'s node unless its artifact was edited.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = shout(right("hi"))
    assert second.value == "HI!" and not second.replayed and ran == ["HI", "HI"]
    assert len(_ours(caught)) == 1
    engine.flush()
    assert payload_of(db_path, first.artifact_id) == original  # repaired by the same content
    third = shout(left("hi"))
    assert third.replayed and third.value == "HI!"


def test_fast_probe_checks_the_content_id_once_while_the_bytes_stay_equal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import musubi_core.fastpath as fastpath

    hashed: list[str] = []
    real = fastpath.artifact_id_for

    def counting(encoding: str, payload: bytes) -> str:
        hashed.append(encoding)
        return real(encoding, payload)

    monkeypatch.setattr(fastpath, "artifact_id_for", counting)
    db = str(tmp_path / "m.db")
    engine = Engine(SQLiteStore(db))
    key = engine.key("demo.memo", "q")
    engine.record(key, "the answer")
    memo = HitMemo(engine)
    first = memo.probe(key)
    assert isinstance(first, EncodedHit) and len(hashed) == 1
    # Asked for again: read and hashed once more, and kept from now on (seen_before).
    second = memo.probe(key)
    assert second == first and len(hashed) == 2
    assert memo.probe(key) is second and len(hashed) == 2  # remembered: not read, not hashed
    engine.record(engine.key("demo.memo", "other"), 1)  # a commit: the hit is read again...
    again = memo.probe(key)
    assert isinstance(again, EncodedHit) and again is not second
    assert again.payload == first.payload and len(hashed) == 2  # ...and compared, not hashed
    edit_payload(db, first.artifact_id, b'"a forged answer"')
    # Neither the memo (its file changed) nor the plain probe answers with the edited bytes:
    # None sends the caller to Engine.lookup, which makes it a miss and warns.
    assert memo.probe(key) is None and len(hashed) == 3  # other bytes: hashed, refused
    assert probe_replay(engine, key) is None
    with pytest.warns(RuntimeWarning, match="content id"):
        assert not engine.lookup(key).replay
    memo.close()
    engine.close()
