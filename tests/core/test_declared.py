"""``musubi_core.declared``: how both adapters run a tool the user declared replayable. The
tool's own errors and an effect in doubt propagate; a store that fails runs the tool live, and
a result that cannot be stored is returned as computed, each with a warning."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from musubi_core import Engine, SQLiteStore
from musubi_core.declared import arun_declared, replay_policy, run_declared
from musubi_core.errors import EffectInDoubtError, SerializationError, StoreError
from musubi_core.policy import StepConfiguration, StepType


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return Engine(SQLiteStore(str(tmp_path / "m.db")))


def test_declarations_name_their_step_type() -> None:
    assert replay_policy("deterministic").step_type is StepType.DETERMINISTIC
    assert replay_policy("External_Effect").step_type is StepType.EXTERNAL_EFFECT
    assert replay_policy(StepType.STOCHASTIC).step_type is StepType.STOCHASTIC
    ttl = StepConfiguration(step_type=StepType.STOCHASTIC, ttl_seconds=5)
    assert replay_policy(ttl) is ttl
    with pytest.raises(ValueError, match="deterministic"):
        replay_policy("sometimes")


def test_a_declared_call_replays_and_an_effect_is_issued_once(engine: Engine) -> None:
    runs: list[str] = []
    warned: list[BaseException] = []
    key = engine.key("tool:send", {"to": "ana"})
    effect = replay_policy("external_effect")
    outcomes = [
        run_declared(engine, key, lambda: runs.append("send") or "sent", effect, warn=warned.append)
        for _ in range(2)
    ]
    assert [o.replayed for o in outcomes] == [False, True] and runs == ["send"]
    assert outcomes[0].node_id == outcomes[1].node_id == key.node_id and not warned
    node = engine.store.get_node(key.node_id)
    assert node is not None and node.kind == "tool_step" and node.step_type == "external_effect"


def test_the_calls_own_error_propagates_and_nothing_replays_it(engine: Engine) -> None:
    key = engine.key("tool:boom", {})
    config = replay_policy("deterministic")

    def boom() -> str:
        raise KeyError("the tool failed")

    for _ in range(2):
        with pytest.raises(KeyError, match="the tool failed"):
            run_declared(engine, key, boom, config, warn=pytest.fail)


def test_a_result_the_codec_refuses_is_returned_as_computed_with_a_warning(engine: Engine) -> None:
    runs: list[int] = []
    warned: list[BaseException] = []
    key = engine.key("tool:handle", {})
    value = object()
    out = run_declared(
        engine, key, lambda: runs.append(1) or value, replay_policy("deterministic"),
        warn=warned.append,
    )
    assert out.value is value and out.node_id is None and runs == [1]
    assert len(warned) == 1 and isinstance(warned[0], SerializationError)


def test_a_store_that_fails_runs_the_call_live_with_a_warning(engine: Engine) -> None:
    key = engine.key("tool:add", {"a": 1})
    engine.close()  # every store call now fails
    warned: list[BaseException] = []
    out = run_declared(engine, key, lambda: 2, replay_policy("deterministic"), warn=warned.append)
    assert out.value == 2 and not out.replayed
    assert len(warned) == 1 and isinstance(warned[0], StoreError)
    assert run_declared(None, None, lambda: 3, replay_policy("deterministic"), warn=pytest.fail).value == 3


def test_an_effect_in_doubt_propagates(engine: Engine) -> None:
    key = engine.key("tool:charge", {"card": "4242"})
    effect = replay_policy("external_effect")
    # An intent row with no live owner: a process died while the effect ran.
    engine.store.write([engine._intent(key, effect, owner=None)])
    with pytest.raises(EffectInDoubtError):
        run_declared(engine, key, lambda: "charged", effect, warn=pytest.fail)


def test_the_async_form_replays(engine: Engine) -> None:
    runs: list[int] = []
    key = engine.key("tool:slow", {})

    async def slow() -> int:
        runs.append(1)
        return 7

    async def twice() -> list[bool]:
        config = replay_policy("deterministic")
        return [(await arun_declared(engine, key, slow, config, warn=pytest.fail)).replayed
                for _ in range(2)]

    assert asyncio.run(twice()) == [False, True] and runs == [1]
