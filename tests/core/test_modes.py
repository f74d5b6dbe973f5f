"""Modes of the engine (record, replay, refresh, off) and the replay miss that explains itself,
on a real SQLite store with ``@step`` functions."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from musubi_core import (
    ConfigError,
    Engine,
    Mode,
    MusubiError,
    ReplayMissError,
    Result,
    SQLiteStore,
    StepConfiguration,
    StepType,
    step,
    use_engine,
)
from musubi_core.replay_miss import differences, material, recent_misses

ran: list[str] = []


@step
def summarize(text: str, temperature: float = 0.0) -> str:
    ran.append(text)
    return text.upper()


@step
def source(tag: str) -> str:
    ran.append(f"source {tag}")
    return f"facts of {tag}"


@step
def combine(facts: Result[str]) -> str:
    ran.append("combine")
    return facts.value + "!"


@pytest.fixture(autouse=True)
def _clear() -> None:
    ran.clear()


def _engine(path: Path, mode: str | None = None) -> Engine:
    return Engine(SQLiteStore(path), mode=mode)


def test_the_mode_comes_from_the_argument_then_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MUSUBI_MODE", raising=False)
    with _engine(tmp_path / "a.db") as engine:
        assert engine.mode is Mode.RECORD
    monkeypatch.setenv("MUSUBI_MODE", "Replay")
    with _engine(tmp_path / "a.db") as engine:
        assert engine.mode is Mode.REPLAY
    with _engine(tmp_path / "a.db", "refresh") as engine:
        assert engine.mode is Mode.REFRESH
    monkeypatch.setenv("MUSUBI_MODE", "playback")
    with pytest.raises(ConfigError, match=r"\$MUSUBI_MODE must be one of record, replay"):
        _engine(tmp_path / "a.db")
    with pytest.raises(ConfigError, match="mode must be one of"):
        _engine(tmp_path / "a.db", "sometimes")


def test_replay_serves_recordings_and_a_miss_names_what_changed(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    with _engine(db) as engine, use_engine(engine):
        summarize("Answer in one sentence. Question: what is musubi?")
    with _engine(db, "replay") as engine, use_engine(engine):
        again = summarize("Answer in one sentence. Question: what is musubi?")
        assert again.replayed and len(ran) == 1
        with pytest.raises(ReplayMissError) as caught:
            summarize("Answer in two sentences. Question: what is musubi?", temperature=0.2)
    assert len(ran) == 1  # the step never ran
    err = caught.value
    assert isinstance(err, MusubiError)
    assert err.kind == "step" and err.op_name.endswith("summarize")
    assert err.reason == "input_changed"
    assert err.nearest_node_id == again.node_id
    assert err.differences == [
        'text: "Answer in one sentence. Question: what is musubi?" -> '
        '"Answer in two sentences. Question: what is musubi?"',
        "temperature: 0.0 -> 0.2",
    ]
    message = str(err)
    assert "nothing was run" in message and str(db) in message
    assert f"nearest recording: node {again.node_id[:12]}" in message
    assert "refresh" in message
    assert recent_misses()[-1] is err


def test_a_miss_says_the_code_changed(tmp_path: Path) -> None:
    db = tmp_path / "m.db"

    def make(body: int) -> object:
        @step(name="app.shout")
        def shout(text: str) -> str:
            return text.upper() + "!" * body

        return shout

    first = make(1)
    with _engine(db) as engine, use_engine(engine):
        first("hi")  # type: ignore[operator]
    edited = make(2)
    edited.fingerprint = "another body"  # type: ignore[attr-defined]
    with _engine(db, "replay") as engine, use_engine(engine), pytest.raises(ReplayMissError) as caught:
        edited("hi")  # type: ignore[operator]
    assert caught.value.differences == ["code of app.shout changed (or its version= pin)"]
    assert caught.value.reason == "code_changed"


def test_a_miss_says_the_upstream_changed(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    with _engine(db) as engine, use_engine(engine):
        old = source("v1")
        combine(old)
        new = source("v2")  # recorded, but never combined
    with _engine(db, "replay") as engine, use_engine(engine):
        with pytest.raises(ReplayMissError) as caught:
            combine(source("v2"))
        with pytest.raises(ReplayMissError) as first:
            source("v3")  # not recorded: the first step of the chain fails, naming its input
    assert caught.value.differences == [
        f"facts: upstream changed (<output {old.artifact_id[:12]}> -> "
        f"<output {new.artifact_id[:12]}>)"
    ]
    assert first.value.differences[0] in ('tag: "v1" -> "v3"', 'tag: "v2" -> "v3"')


def test_replay_by_content_still_replays(tmp_path: Path) -> None:
    """Same content through another upstream node: served, as in record mode."""
    db = tmp_path / "m.db"

    @step(name="app.same")
    def same(tag: str) -> str:
        return "the same facts"

    with _engine(db) as engine, use_engine(engine):
        combine(same("v1"))
        other = same("v2")
    with _engine(db, "replay") as engine, use_engine(engine):
        assert combine(other).replayed


def test_a_recording_does_not_expire_in_replay_and_refresh(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    calls: list[int] = []

    @step(name="app.quote", semantics=StepConfiguration(step_type=StepType.STOCHASTIC,
                                                       ttl_seconds=0.05))
    def quote(topic: str) -> int:
        calls.append(1)
        return len(calls)

    with _engine(db) as engine, use_engine(engine):
        quote("gpu")
    time.sleep(0.1)
    for mode in ("replay", "refresh"):
        with _engine(db, mode) as engine, use_engine(engine):
            assert quote("gpu").value == 1
            assert quote.explain("gpu").replay
    with _engine(db, "record") as engine, use_engine(engine):
        assert quote("gpu").value == 2  # expired in record mode
    assert len(calls) == 2


def test_an_effect_is_never_issued_in_replay(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    sent: list[str] = []

    @step(name="app.send", semantics=StepConfiguration(step_type=StepType.EXTERNAL_EFFECT,
                                                      force_reexecution=True))
    def send(to: str) -> str:
        sent.append(to)
        return f"sent to {to}"

    with _engine(db) as engine, use_engine(engine):
        send("ana")
    with _engine(db, "replay") as engine, use_engine(engine):
        assert send("ana").replayed  # force_reexecution cannot make it run in replay mode
        with pytest.raises(ReplayMissError):
            send("bob")
        engine.flush()
        assert engine.store.list_nodes(op="app.send", status="pending") == []
    assert sent == ["ana"]


def test_refresh_replays_what_matches_and_records_what_does_not(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    with _engine(db) as engine, use_engine(engine):
        summarize("one")
    with _engine(db, "refresh") as engine, use_engine(engine):
        assert summarize("one").replayed
        assert not summarize("two").replayed
    with _engine(db, "replay") as engine, use_engine(engine):
        assert summarize("two").replayed
    assert ran == ["one", "two"]


def test_off_runs_every_step_and_stores_nothing(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    with _engine(db, "off") as engine, use_engine(engine):
        first = combine(source("v1"))
        second = combine(source("v1"))
        engine.flush()
        assert engine.store.list_nodes() == [] and engine.store.list_runs() == []
    assert ran == ["source v1", "combine", "source v1", "combine"]
    assert first.value == second.value == "facts of v1!" and not second.replayed
    assert first.artifact_id == second.artifact_id != ""


def test_recordings_keep_their_material_without_secrets() -> None:
    kept = material(
        {"prompt": "x" * 10_000, "api_key": "sk-live-123", "max_tokens": 5,
         "headers": {"Authorization": "Bearer t0k3n"}, "db_password": "hunter2"},
        {"model": "m", "openai_api_key": "sk-live-456",
         "openai_api_base": "https://bob:s3cr3t@proxy.example/v1"},
    )
    text = json.dumps(kept)
    assert kept["fingerprint"]["openai_api_base"] == "https://<redacted>@proxy.example/v1"
    for secret in ("sk-live-123", "sk-live-456", "t0k3n", "hunter2", "s3cr3t"):
        assert secret not in text
    assert kept["inputs"]["max_tokens"] == 5
    assert kept["inputs"]["prompt"]["$len"] == 10_000 and len(text) < 8_000
    changed = material({"prompt": "x" * 5_000 + "y" * 5_000})
    assert differences(material({"prompt": "x" * 10_000}), changed)[0].startswith("prompt: ")


def test_a_step_recording_keeps_its_arguments(tmp_path: Path) -> None:
    with _engine(tmp_path / "m.db") as engine, use_engine(engine):
        node_id = summarize("kept", temperature=0.5).node_id
        node = engine.store.get_node(node_id)
    assert node is not None and node.meta is not None
    assert json.loads(node.meta) == {"inputs": {"temperature": {"$float": "0.5"}, "text": "kept"}}
