"""Every example of the decorator seed's README (shared/seeds/000_*.txt), with
musubi's names and fake functions standing in for the LLM SDK calls. Each test
counts how often the "LLM" really ran."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from musubi_core import (
    Engine,
    Result,
    SQLiteStore,
    StepConfiguration,
    StepType,
    merge,
    step,
    use_engine,
)


def fake_llm(calls: Counter[str], name: str, prompt: str) -> str:
    calls[name] += 1
    return f"{name}:{prompt[::-1]}"


def test_single_llm_call_with_permanent_cache(engine: Engine, calls: Counter[str]) -> None:
    @step(semantics=StepConfiguration(step_type=StepType.DETERMINISTIC))
    def explain_runtime(prompt: str) -> str:
        return fake_llm(calls, "openai", prompt)

    prompt = "Explain deterministic replay for LLM research agents in five bullets."
    start = time.perf_counter()
    first = explain_runtime(prompt)
    first_ms = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    second = explain_runtime(prompt)
    second_ms = (time.perf_counter() - start) * 1000
    print(f"first={first_ms:.2f} ms replay={second_ms:.2f} ms")

    assert calls["openai"] == 1
    assert first.value[:200] == second.value[:200] == fake_llm(Counter(), "openai", prompt)
    assert (first.replayed, second.replayed) == (False, True)
    assert first.node_id == second.node_id == first.producer_node_id
    assert first.artifact_id == second.artifact_id
    assert isinstance(first, Result)
    # A different prompt is a different node.
    other = explain_runtime(prompt + "!")
    assert calls["openai"] == 2 and other.node_id != first.node_id


def test_expiring_cache_for_fresh_answers(
    engine: Engine, calls: Counter[str], clock: Any
) -> None:
    fresh_hourly = StepConfiguration(step_type=StepType.STOCHASTIC, ttl_seconds=3600)

    @step(semantics=fresh_hourly)
    def market_brief(topic: str) -> str:
        return fake_llm(calls, "openai", f"Write a concise market-watch brief about {topic}.")

    result = market_brief("AI infrastructure startups")
    assert calls["openai"] == 1 and not result.replayed
    clock.advance(3599)
    again = market_brief("AI infrastructure startups")
    assert calls["openai"] == 1 and again.replayed and again.value == result.value
    assert market_brief.explain("AI infrastructure startups").replay
    clock.advance(2)  # one hour and one second after the first call
    decision = market_brief.explain("AI infrastructure startups")
    assert not decision.replay and decision.reason.value == "ttl_expired"
    refreshed = market_brief("AI infrastructure startups")
    assert calls["openai"] == 2 and not refreshed.replayed
    assert refreshed.node_id == result.node_id  # same node, refreshed in place
    # The refreshed result has a new hour of life.
    clock.advance(3000)
    assert market_brief("AI infrastructure startups").replayed
    assert calls["openai"] == 2


def test_two_step_pipeline_with_lineage(
    engine: Engine, calls: Counter[str], clock: Any
) -> None:
    @step()
    def extract_key_facts(text: str) -> str:
        return fake_llm(calls, "extract", text)

    @step(semantics=StepConfiguration(step_type=StepType.STOCHASTIC, ttl_seconds=86400))
    def write_social_summary(facts: Result[str]) -> str:
        return fake_llm(calls, "tweet", f"Write one tweet:\n{facts.value}")

    def pipeline() -> tuple[Result[str], Result[str]]:
        source_text = "Musubito records execution lineage for replayable agent steps."
        facts = extract_key_facts(source_text)
        with merge(facts):
            summary = write_social_summary(facts)
        return facts, summary

    facts, summary = pipeline()
    assert calls == Counter({"extract": 1, "tweet": 1})
    assert summary.value.startswith("tweet:")
    # Lineage: one data edge from the facts node into the summary node.
    edges = engine.store.edges(summary.node_id)
    assert [(e.parent, e.child, e.kind) for e in edges] == [
        (facts.node_id, summary.node_id, "data")
    ]
    assert edges[0].parent_artifact_id == facts.artifact_id
    nodes, _ = engine.store.lineage(summary.node_id)
    assert {n.node_id for n in nodes} == {facts.node_id, summary.node_id}

    # Re-running saves both calls.
    facts2, summary2 = pipeline()
    assert calls == Counter({"extract": 1, "tweet": 1})
    assert facts2.replayed and summary2.replayed
    assert summary2.node_id == summary.node_id

    # A day later the extraction is still replayed; the summary refreshes.
    clock.advance(86401)
    facts3, summary3 = pipeline()
    assert calls == Counter({"extract": 1, "tweet": 2})
    assert facts3.replayed and not summary3.replayed


def test_custom_storage_path_for_a_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calls: Counter[str]
) -> None:
    monkeypatch.chdir(tmp_path)

    @step()
    def classify_note(note: str) -> str:
        return fake_llm(calls, "classify", f"Classify this research note in one label:\n{note}")

    storage = SQLiteStore(".musubito/project-alpha.db")
    engine = Engine(storage)
    with storage, use_engine(engine):
        result = classify_note("GPU scheduling dominates the serving bottleneck.")
    assert calls["classify"] == 1
    assert result.value.startswith("classify:")
    assert (tmp_path / ".musubito" / "project-alpha.db").is_file()
    assert not (tmp_path / ".musubi").exists()

    # A second engine on the same project file replays.
    with Engine(SQLiteStore(".musubito/project-alpha.db")) as again, use_engine(again):
        assert classify_note("GPU scheduling dominates the serving bottleneck.").replayed
    assert calls["classify"] == 1
    # A different project file keeps its own history.
    with Engine(SQLiteStore(".musubito/project-beta.db")) as beta, use_engine(beta):
        assert not classify_note("GPU scheduling dominates the serving bottleneck.").replayed
    assert calls["classify"] == 2


def test_step_configuration_default_is_deterministic(engine: Engine, calls: Counter[str]) -> None:
    @step()
    def normalize(text: str) -> str:
        calls["normalize"] += 1
        return text.strip().lower()

    assert normalize.semantics == StepConfiguration()
    assert normalize.semantics.step_type is StepType.DETERMINISTIC
    assert normalize("  Hello ").value == "hello"
    assert normalize("  Hello ").replayed
    assert calls["normalize"] == 1
    record = engine.store.get_node(normalize("  Hello ").node_id)
    assert record is not None and record.step_type == "deterministic"


def test_step_configuration_stochastic_with_ttl(
    engine: Engine, calls: Counter[str], clock: Any
) -> None:
    llm_semantics = StepConfiguration(step_type=StepType.STOCHASTIC, ttl_seconds=3600)

    @step(semantics=llm_semantics)
    def draft_answer(prompt: str) -> str:
        calls["draft"] += 1
        return prompt.upper()

    assert draft_answer("q").value == "Q"
    assert draft_answer("q").replayed
    clock.advance(3600)
    assert not draft_answer("q").replayed
    assert calls["draft"] == 2
    record = engine.store.get_node(draft_answer("q").node_id)
    assert record is not None and record.step_type == "stochastic"
    assert record.expires_at is not None and record.finished_at is not None
    assert record.expires_at - record.finished_at == pytest.approx(3600)


def test_step_configuration_force_reexecution(engine: Engine, calls: Counter[str]) -> None:
    fresh_semantics = StepConfiguration(step_type=StepType.STOCHASTIC, force_reexecution=True)

    @step(semantics=fresh_semantics)
    def generate_fresh_answer(prompt: str) -> str:
        calls["fresh"] += 1
        return prompt.upper() + str(calls["fresh"])

    results = [generate_fresh_answer("q") for _ in range(3)]
    assert calls["fresh"] == 3
    assert [r.replayed for r in results] == [False, False, False]
    assert [r.value for r in results] == ["Q1", "Q2", "Q3"]
    # Each forced run replaces the stored artifact.
    record = engine.store.get_node(results[0].node_id)
    assert record is not None and record.artifact_id == results[-1].artifact_id
    assert record.exec_count == 3
    decision = generate_fresh_answer.explain("q")
    assert not decision.replay and decision.reason.value == "forced"


def test_step_configuration_external_effect(engine: Engine, calls: Counter[str]) -> None:
    external_semantics = StepConfiguration(step_type=StepType.EXTERNAL_EFFECT)

    @step(semantics=external_semantics)
    def call_external_tool(payload: dict[str, str]) -> dict[str, str]:
        calls["tool"] += 1
        return {"status": "recorded", "id": payload["id"]}

    first = call_external_tool({"id": "42"})
    second = call_external_tool({"id": "42"})
    assert calls["tool"] == 1
    assert first.value == second.value == {"status": "recorded", "id": "42"}
    assert second.replayed
    call_external_tool({"id": "43"})
    assert calls["tool"] == 2

    # With a pinned name and version, a forced variant reaches the same node:
    # it issues the effect again and replaces the stored result, which the
    # unforced step then replays.
    pinned_version = {"version": "1"}

    @step(
        semantics=StepConfiguration(step_type=StepType.EXTERNAL_EFFECT, **pinned_version),
        name="tools.call",
    )
    def send(payload: dict[str, str]) -> dict[str, str]:
        calls["send"] += 1
        return {"status": "sent", "n": str(calls["send"])}

    @step(
        semantics=StepConfiguration(
            step_type=StepType.EXTERNAL_EFFECT, force_reexecution=True, **pinned_version
        ),
        name="tools.call",
    )
    def send_again(payload: dict[str, str]) -> dict[str, str]:
        calls["send"] += 1
        return {"status": "sent", "n": str(calls["send"])}

    assert send({"id": "1"}).value == {"status": "sent", "n": "1"}
    assert send({"id": "1"}).replayed
    forced = send_again({"id": "1"})
    assert not forced.replayed and forced.value == {"status": "sent", "n": "2"}
    assert send_again({"id": "1"}).value == {"status": "sent", "n": "3"}
    replayed = send({"id": "1"})
    assert replayed.replayed and replayed.value == {"status": "sent", "n": "3"}
    assert replayed.node_id == forced.node_id
    assert calls["send"] == 3


def test_using_a_custom_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calls: Counter[str]
) -> None:
    monkeypatch.chdir(tmp_path)

    @step()
    def summarize_text(text: str) -> str:
        calls["summarize"] += 1
        return text.upper()

    for _ in range(2):
        with SQLiteStore(".my_run/run.db") as storage:
            engine = Engine(storage)
            with use_engine(engine):
                result = summarize_text("Musubito records deterministic lineage.")
            engine.flush()
        # The value is usable after the store is closed.
        assert result.value == "MUSUBITO RECORDS DETERMINISTIC LINEAGE."
    assert calls["summarize"] == 1
    assert result.replayed
    with SQLiteStore(".my_run/run.db") as storage:
        stats = storage.stats()
    assert (stats["nodes"], stats["executions"], stats["replays"]) == (1, 1, 1)


def test_default_storage_location(
    run_py: Any, tmp_path: Path, parse_json: Any, make_env: Any
) -> None:
    """Without use_engine, steps go to .musubi/musubi.db under the working
    directory (or $MUSUBI_DB), and a second process replays from it."""
    code = """
        import json
        from musubi_core import step

        executed = []

        @step()
        def normalize(text: str) -> str:
            executed.append(text)
            return text.strip().lower()

        r = normalize("  Hello ")
        print(json.dumps({"value": r.value, "replayed": r.replayed, "executed": len(executed)}))
    """
    first = parse_json(run_py(code))
    second = parse_json(run_py(code))
    assert first == {"value": "hello", "replayed": False, "executed": 1}
    assert second == {"value": "hello", "replayed": True, "executed": 0}
    assert (tmp_path / ".musubi" / "musubi.db").is_file()

    env = make_env(MUSUBI_DB=str(tmp_path / "elsewhere" / "x.db"))
    third = parse_json(run_py(code, env=env))
    assert third["executed"] == 1
    assert (tmp_path / "elsewhere" / "x.db").is_file()
