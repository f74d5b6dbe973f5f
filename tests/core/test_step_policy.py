"""Replay policy through @step: the three step types behave differently, TTL,
force, failures, explain(), version pins, Result arguments, merge, async."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from pydantic import ValidationError

from musubi_core import (
    EffectInDoubtError,
    Engine,
    ReplayReason,
    Result,
    SerializationError,
    StepConfiguration,
    StepType,
    current_node,
    merge,
    step,
)
from musubi_core.policy import decide
from musubi_core.store import NodeRecord

# -- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize("step_type", [StepType.DETERMINISTIC, StepType.EXTERNAL_EFFECT])
def test_ttl_is_rejected_for_non_stochastic_steps(step_type: StepType) -> None:
    with pytest.raises(ValidationError, match="STOCHASTIC"):
        StepConfiguration(step_type=step_type, ttl_seconds=60)
    with pytest.raises(ValidationError):
        step(step_type=step_type, ttl_seconds=60)


def test_configuration_validation() -> None:
    with pytest.raises(ValidationError):
        StepConfiguration(step_type=StepType.STOCHASTIC, ttl_seconds=0)
    with pytest.raises(ValidationError):
        StepConfiguration(unknown_field=1)  # type: ignore[call-arg]
    config = StepConfiguration(step_type=StepType.STOCHASTIC, ttl_seconds=5)
    with pytest.raises(ValidationError):
        config.ttl_seconds = 10  # frozen
    assert step(step_type=StepType.STOCHASTIC, ttl_seconds=5)(lambda: 1).semantics == config


def _record(status: str, **kw: Any) -> NodeRecord:
    fields: dict[str, Any] = dict(
        node_id="n", op="op", op_name="op", kind="step", step_type="deterministic",
        input_hash="h", status=status, artifact_id="a", producer_node_id="n",
        namespace="default", created_at=0.0, started_at=0.0, finished_at=0.0, expires_at=None,
        duration_s=None, tokens_in=None, tokens_out=None, replay_count=0, exec_count=1,
        error=None, owner=None, label=None, run_id=None, stale_cause=None, meta=None,
    )
    fields.update(kw)
    return NodeRecord(**fields)


def test_decide_is_a_pure_table() -> None:
    det = StepConfiguration()
    sto = StepConfiguration(step_type=StepType.STOCHASTIC, ttl_seconds=10)
    eff = StepConfiguration(step_type=StepType.EXTERNAL_EFFECT)
    forced = StepConfiguration(step_type=StepType.EXTERNAL_EFFECT, force_reexecution=True)
    done = _record("done", expires_at=10.0)

    def reason(node: NodeRecord | None, config: StepConfiguration, **kw: Any) -> ReplayReason:
        return decide(node, config, now=kw.pop("now", 5.0), **kw).reason

    assert reason(None, det) is ReplayReason.NOT_FOUND
    assert reason(done, det) is ReplayReason.HIT
    assert reason(done, sto) is ReplayReason.HIT
    assert reason(done, sto, now=10.0) is ReplayReason.TTL_EXPIRED
    assert reason(done, forced) is ReplayReason.FORCED
    assert reason(None, forced) is ReplayReason.FORCED
    assert reason(_record("failed"), det) is ReplayReason.FAILED
    assert reason(_record("stale"), det) is ReplayReason.STALE
    assert reason(_record("stale"), det, upstream_fresh=True) is ReplayReason.HIT
    assert reason(_record("pending"), det) is ReplayReason.PENDING
    assert reason(_record("pending"), eff) is ReplayReason.EFFECT_IN_DOUBT
    assert reason(_record("done", artifact_id=None), det) is ReplayReason.ARTIFACT_MISSING
    assert reason(done, det, artifact_present=False) is ReplayReason.ARTIFACT_MISSING
    assert decide(done, det, now=0).replay and str(decide(done, det, now=0)).startswith("replay")
    assert str(decide(None, det, now=0)).startswith("execute (not_found)")


# -- the three step types ---------------------------------------------------------------


def test_the_three_step_types_behave_differently(engine: Engine, clock: Any) -> None:
    """Same history (executed, then an hour passes, then a crash leaves a
    pending row), three different outcomes."""
    calls: Counter[str] = Counter()

    @step(step_type=StepType.DETERMINISTIC)
    def det(x: int) -> int:
        calls["det"] += 1
        return x

    @step(step_type=StepType.STOCHASTIC, ttl_seconds=60)
    def sto(x: int) -> int:
        calls["sto"] += 1
        return x

    @step(step_type=StepType.EXTERNAL_EFFECT)
    def eff(x: int) -> int:
        calls["eff"] += 1
        return x

    for fn in (det, sto, eff):
        fn(1)
        fn(1)
    assert calls == Counter({"det": 1, "sto": 1, "eff": 1})
    clock.advance(3600)
    for fn in (det, sto, eff):
        fn(1)
    # Only the stochastic step expires.
    assert calls == Counter({"det": 1, "sto": 2, "eff": 1})
    records = {fn.name: engine.store.get_node(fn(1).node_id) for fn in (det, sto, eff)}
    assert {name.rsplit(".", 1)[-1]: r.step_type for name, r in records.items() if r} == {
        "det": "deterministic", "sto": "stochastic", "eff": "external_effect",
    }
    assert records[det.name].expires_at is None  # type: ignore[union-attr]
    assert records[eff.name].expires_at is None  # type: ignore[union-attr]


def test_stochastic_without_ttl_replays_forever(engine: Engine, clock: Any) -> None:
    calls: Counter[str] = Counter()

    @step(step_type=StepType.STOCHASTIC)
    def chat(prompt: str) -> str:
        calls["chat"] += 1
        return prompt

    chat("hi")
    clock.advance(10 * 365 * 86400)
    assert chat("hi").replayed
    assert calls["chat"] == 1


def test_external_effect_writes_its_intent_before_the_call(engine: Engine) -> None:
    seen: list[Any] = []

    @step(step_type=StepType.EXTERNAL_EFFECT)
    def send_email(to: str) -> str:
        node_id = current_node()
        assert node_id is not None
        seen.append(engine.store.get_node(node_id))
        return f"sent to {to}"

    result = send_email("a@example.com")
    assert len(seen) == 1
    intent = seen[0]
    assert intent is not None
    assert intent.node_id == result.node_id
    assert intent.status == "pending" and intent.owner
    assert intent.step_type == "external_effect"
    assert intent.artifact_id is None and intent.exec_count == 0
    after = engine.store.get_node(result.node_id)
    assert after is not None and after.status == "done" and after.exec_count == 1


def test_deterministic_step_writes_nothing_before_the_call(engine: Engine) -> None:
    seen: list[Any] = []

    @step()
    def parse(text: str) -> str:
        node_id = current_node()
        assert node_id is not None
        seen.append(engine.store.get_node(node_id))
        return text

    parse("x")
    assert seen == [None]


def test_failed_external_effect_is_not_in_doubt(engine: Engine) -> None:
    calls: Counter[str] = Counter()

    @step(step_type=StepType.EXTERNAL_EFFECT)
    def flaky(x: int) -> int:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise ConnectionError("refused")
        return x

    with pytest.raises(ConnectionError):
        flaky(1)
    assert flaky.explain(1).reason is ReplayReason.FAILED
    assert flaky(1).value == 1
    assert calls["flaky"] == 2


def test_failed_nodes_are_never_replayed(engine: Engine) -> None:
    calls: Counter[str] = Counter()

    @step()
    def fragile(x: int) -> int:
        calls["fragile"] += 1
        if calls["fragile"] < 3:
            raise ValueError(f"attempt {calls['fragile']}")
        return x * 10

    for attempt in (1, 2):
        with pytest.raises(ValueError, match=f"attempt {attempt}"):
            fragile(4)
    key, _ = fragile.key(4)
    record = engine.store.get_node(key.node_id)
    assert record is not None and record.status == "failed"
    assert record.error == "ValueError: attempt 2"
    assert fragile(4).value == 40
    assert fragile(4).replayed
    assert calls["fragile"] == 3


def test_force_reexecution_replaces_the_stored_artifact(engine: Engine) -> None:
    calls: Counter[str] = Counter()

    def body(prompt: str) -> str:
        calls["n"] += 1
        return f"{prompt}-{calls['n']}"

    normal = step(name="llm.answer", version="1")(body)
    forced = step(name="llm.answer", version="1",
                  semantics=StepConfiguration(force_reexecution=True))(body)
    first = normal("q")
    assert normal("q").value == "q-1"
    second = forced("q")
    assert second.node_id == first.node_id and not second.replayed
    assert second.value == "q-2" and second.artifact_id != first.artifact_id
    again = normal("q")
    assert again.replayed and again.value == "q-2"
    assert calls["n"] == 2


# -- explain ----------------------------------------------------------------------------


def test_explain_gives_reasons_without_running_or_counting(engine: Engine) -> None:
    calls: Counter[str] = Counter()

    @step(name="demo.square")
    def square(x: int) -> int:
        calls["square"] += 1
        return x * x

    assert square.explain(3).reason is ReplayReason.NOT_FOUND
    first = square(3)
    assert square.explain(3).reason is ReplayReason.HIT and square.explain(3).replay
    assert square.explain(4).reason is ReplayReason.INPUT_CHANGED
    engine.flush()
    record = engine.store.get_node(first.node_id)
    assert record is not None and record.replay_count == 0
    assert calls["square"] == 1

    @step(name="demo.square")
    def square_v2(x: int) -> int:
        calls["square"] += 1
        return x**2 + 0

    decision = square_v2.explain(3)
    assert decision.reason is ReplayReason.CODE_CHANGED and "changed" in decision.detail

    @step(name="demo.source")
    def source(tag: str) -> int:
        return 7  # the same output whatever the tag

    @step(name="demo.use")
    def use(value: Result[int]) -> int:
        return value.value

    used = use(source("a"))
    # Same operation, same input (the artifact), but another upstream node: the output of the
    # node reached through the first upstream replays (content across upstreams)...
    decision = use.explain(source("b"))
    assert decision.replay and decision.reason is ReplayReason.CONTENT_HIT
    assert decision.node_id != used.node_id and used.node_id[:12] in decision.detail

    # ...unless the step asks for the strict rule (@step(strict_upstream=True)).
    key, _ = use.key(source("b"))
    decision = engine.explain(key, StepConfiguration(strict_upstream=True))
    assert decision.reason is ReplayReason.UPSTREAM_CHANGED
    engine.invalidate(first.node_id)
    assert square.explain(3).reason is ReplayReason.STALE
    assert calls["square"] == 1


def test_code_change_misses_and_version_pin_replays(engine: Engine) -> None:
    calls: Counter[str] = Counter()

    def original() -> Any:
        @step(name="pin.me")
        def body(x: int) -> int:
            calls["v"] += 1
            return x

        return body

    def edited() -> Any:
        @step(name="pin.me")
        def body(x: int) -> int:
            calls["v"] += 1
            return x + 0

        return body

    def documented() -> Any:
        @step(name="pin.me")
        def body(x: int) -> int:
            """A docstring and comments do not change the fingerprint."""
            # a comment
            calls["v"] += 1  # counted

            return x

        return body

    original()(1)
    assert not edited()(1).replayed
    assert documented()(1).replayed
    assert calls["v"] == 2

    @step(name="pinned", version="2024-01")
    def p1(x: int) -> int:
        calls["p"] += 1
        return x

    @step(name="pinned", version="2024-01")
    def p2(x: int) -> int:
        calls["p"] += 1
        return x * 1

    @step(name="pinned", version="2024-02")
    def p3(x: int) -> int:
        calls["p"] += 1
        return x

    p1(1)
    assert p2(1).replayed
    assert not p3(1).replayed
    assert calls["p"] == 2


# -- Result arguments, merge ------------------------------------------------------------


def test_result_arguments_become_data_edges(engine: Engine) -> None:
    @step()
    def load(name: str) -> str:
        return name.upper()

    @step()
    def combine(parts: list[Result[str]], sep: str = "+") -> str:
        return sep.join(p.value for p in parts)

    a, b = load("a"), load("b")
    joined = combine([a, b])
    assert joined.value == "A+B"
    parents = {e.parent: e.parent_artifact_id for e in engine.store.edges(joined.node_id)}
    assert parents == {a.node_id: a.artifact_id, b.node_id: b.artifact_id}
    assert all(e.kind == "data" for e in engine.store.edges(joined.node_id))
    # Order of the upstream list is part of the input, the edges are a set.
    assert combine([b, a]).value == "B+A"
    assert combine([a, b]).replayed


def test_merge_adds_explicit_parents(engine: Engine) -> None:
    calls: Counter[str] = Counter()

    @step()
    def src(x: int) -> int:
        return x

    @step()
    def agg(label: str) -> str:
        calls["agg"] += 1
        return label

    x, y = src(1), src(2)
    plain = agg("total")
    with merge(x, y):
        merged = agg("total")
        with merge(x):
            again = agg("total")
    assert plain.node_id != merged.node_id
    assert merged.node_id == again.node_id and again.replayed  # duplicates collapse
    assert {e.parent for e in engine.store.edges(merged.node_id)} == {x.node_id, y.node_id}
    assert engine.store.edges(plain.node_id) == []
    assert calls["agg"] == 2
    with pytest.raises(TypeError, match="Result"), merge(1):  # type: ignore[arg-type]
        pass


def test_nested_steps_are_calls_under_their_caller(engine: Engine) -> None:
    @step()
    def inner(x: int) -> int:
        return x + 1

    @step()
    def outer(x: int) -> int:
        return inner(x).value * 2

    result = outer(1)
    engine.flush()
    assert result.call_id is not None
    outer_call = engine.store.get_call(result.call_id)
    assert outer_call is not None and outer_call.parent_call_id is None
    calls = engine.store.run_calls(outer_call.run_id)
    assert [(c.op_name.rsplit(".", 1)[-1], c.parent_call_id) for c in calls] == [
        ("outer", None),
        ("inner", result.call_id),
    ]
    (run,) = engine.store.list_runs()
    assert (run.kind, run.calls, run.root_call_id) == ("step", 2, result.call_id)
    # The memo holds no call tree: nodes have no contains edges.
    assert engine.store.edges(result.node_id) == []


# -- async ------------------------------------------------------------------------------


def test_async_steps_replay(engine: Engine) -> None:
    calls: Counter[str] = Counter()

    @step(step_type=StepType.STOCHASTIC)
    async def achat(prompt: str) -> str:
        calls["achat"] += 1
        await asyncio.sleep(0)
        return prompt[::-1]

    @step(step_type=StepType.EXTERNAL_EFFECT)
    async def apost(payload: Result[str]) -> str:
        calls["apost"] += 1
        return "posted " + payload.value

    async def main() -> list[Result[str]]:
        first = await achat("abc")
        posted = await apost(first)
        return [first, posted, await achat("abc"), await apost(first)]

    first, posted, again, posted_again = asyncio.run(main())
    assert first.value == "cba" and posted.value == "posted cba"
    assert again.replayed and posted_again.replayed
    assert calls == Counter({"achat": 1, "apost": 1})


def test_bare_decorator_and_repr(engine: Engine) -> None:
    @step
    def plain(x: int) -> int:
        return x

    assert plain(1).value == 1 and plain(1).replayed
    assert "deterministic" in repr(plain)
    assert plain.__name__ == "plain"
    with pytest.raises(TypeError):
        plain.key(1, 2)  # binding follows the signature


def test_effect_whose_result_cannot_be_stored_is_in_doubt(engine: Engine) -> None:
    """The effect ran, but its result cannot be encoded: SerializationError
    carries it, and the next call raises EffectInDoubtError instead of
    silently issuing the effect a second time."""
    calls: Counter[str] = Counter()

    class Receipt:  # not encodable
        pass

    receipt = Receipt()

    @step(name="effects.pay", version="1", step_type=StepType.EXTERNAL_EFFECT)
    def pay(cents: int) -> Any:
        calls["pay"] += 1
        return receipt

    @step(name="effects.pay", version="1",
          semantics=StepConfiguration(step_type=StepType.EXTERNAL_EFFECT, force_reexecution=True))
    def pay_again(cents: int) -> Any:
        calls["pay"] += 1
        return {"receipt": "r-2"}

    with pytest.raises(SerializationError) as raised:
        pay(100)
    assert raised.value.value is receipt
    for _ in range(2):
        with pytest.raises(EffectInDoubtError):
            pay(100)
    assert calls["pay"] == 1
    record = engine.store.get_node(pay.key(100)[0].node_id)
    assert record is not None and record.status == "pending"
    assert record.error is not None and "not stored" in record.error
    assert pay_again(100).value == {"receipt": "r-2"}
    assert pay(100).replayed
    assert calls["pay"] == 2


# -- what a lookup says it served --------------------------------------------------------


def test_a_plain_hit_says_what_it_served_and_reads_its_node_only_when_asked(
    engine: Engine,
) -> None:
    """A plain hit is served from the probe's one statement: its Lookup names the node, the
    artifact, its producer and what the execution cost, and its ``node`` (read on demand) is
    the stored node; a stale node takes the full lookup and says the same from the node."""
    key = engine.key("lookup.served", {"q": 1})
    engine.record(key, "answer", tokens_in=7, tokens_out=3)
    engine.flush()
    stored = engine.store.get_node(key.node_id)
    assert stored is not None and stored.artifact_id is not None

    got = engine.lookup(key)
    assert got.replay and got.value == "answer" and got.decision.reason is ReplayReason.HIT
    assert (got.node_id, got.artifact_id, got.producer_node_id) == (
        key.node_id, stored.artifact_id, key.node_id,
    )
    assert (got.tokens_in, got.tokens_out) == (7, 3)
    assert got.duration_s == stored.duration_s
    engine.flush()  # the replay was counted
    node = got.node
    assert node is not None and node.node_id == key.node_id and node.replay_count == 1

    missing = engine.lookup(engine.key("lookup.served", {"q": 2}))
    assert not missing.replay and missing.node is None and missing.artifact_id is None
    assert missing.decision.reason is ReplayReason.NOT_FOUND

    assert engine.invalidate(key.node_id) == 1
    stale = engine.lookup(key)
    assert not stale.replay and stale.decision.reason is ReplayReason.STALE
    assert stale.node is not None and stale.node_id == key.node_id
    assert stale.artifact_id == stored.artifact_id
