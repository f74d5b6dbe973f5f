"""Namespaces in the core: an Engine's namespace is a separate cache in a shared store.

Outside ``"default"`` the namespace is part of every node id; an engine serves only nodes of
its own namespace (rows an older musubi wrote in another namespace at what is now a default
id included) and ``clear()`` forgets exactly its own entries. Default ids are unchanged.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from musubi_core import ConfigError, Engine, Result, SQLiteStore, step, use_engine
from musubi_core.identity import input_hash, make_node_id, make_op
from musubi_core.policy import ReplayReason, StepType


@pytest.fixture
def store(tmp_path: Path) -> SQLiteStore:
    return SQLiteStore(str(tmp_path / "m.db"))


def _namespace_of(store: SQLiteStore, node_id: str) -> str | None:
    node = store.get_node(node_id)
    return None if node is None else node.namespace


def test_node_ids_are_pinned_and_default_ones_unchanged(store: SQLiteStore) -> None:
    op, h, ups = make_op("demo.add", {"code": "x"}), input_hash({"a": 1, "b": 2}), ["b" * 64]
    # The id musubi 0.1 made (existing stores keep replaying) and a namespaced id: literals,
    # so a change of either scheme fails here (ids must agree across versions and machines).
    default = "a6f50cdadef2a8edb36f0531bacaa86f5aa782114f6a61ce96b2057bb1c4ec33"
    assert make_node_id(op, h, ups) == make_node_id(op, h, ups, "default") == default
    alpha = "08d9535a01c458f705d753256e982d11757932c3b2286914f525a855194ee2be"
    assert make_node_id(op, h, ups, "alpha") == alpha
    key = Engine(store, namespace="alpha").key("demo.add", {"a": 1, "b": 2})
    assert key.namespace == "alpha"
    assert key.node_id == make_node_id("demo.add", input_hash({"a": 1, "b": 2}), (), "alpha")
    assert Engine(store).key("demo.add", {"a": 1, "b": 2}).node_id == make_node_id(
        "demo.add", input_hash({"a": 1, "b": 2})
    )


def test_a_namespace_enters_the_node_id(store: SQLiteStore) -> None:
    alpha, beta = Engine(store, namespace="alpha"), Engine(store, namespace="beta")
    default = Engine(store)
    ids = {e.namespace: e.key("op", {"q": 1}).node_id for e in (alpha, beta, default)}
    assert len(set(ids.values())) == 3
    assert alpha.key("op", {"q": 1}).namespace == "alpha"
    # Stable: the same namespace, op and inputs give the same id in any engine or process.
    assert Engine(store, namespace="alpha").key("op", {"q": 1}).node_id == ids["alpha"]
    # Unambiguous: a namespace cannot spell another namespace's id or op.
    op, h = make_op("op"), input_hash(1)
    assert make_node_id(op, h, (), "a\x1fb") != make_node_id("b\x1f" + op, h, (), "a")


def test_engines_in_two_namespaces_keep_separate_entries(store: SQLiteStore) -> None:
    alpha, beta = Engine(store, namespace="alpha"), Engine(store, namespace="beta")
    alpha.record(alpha.key("llm.call", {"prompt": "hi"}), "alpha's answer")
    miss = beta.lookup(beta.key("llm.call", {"prompt": "hi"}))
    assert not miss.replay and miss.decision.reason is ReplayReason.NOT_FOUND
    assert beta.explain(beta.key("llm.call", {"prompt": "hi"})).reason is ReplayReason.NOT_FOUND
    beta.record(beta.key("llm.call", {"prompt": "hi"}), "beta's answer")
    # beta's write overwrote nothing of alpha's.
    assert alpha.lookup(alpha.key("llm.call", {"prompt": "hi"})).value == "alpha's answer"
    assert beta.lookup(beta.key("llm.call", {"prompt": "hi"})).value == "beta's answer"
    a_id, b_id = alpha.key("llm.call", {"prompt": "hi"}).node_id, beta.key(
        "llm.call", {"prompt": "hi"}
    ).node_id
    assert (_namespace_of(store, a_id), _namespace_of(store, b_id)) == ("alpha", "beta")


def test_step_runs_once_per_namespace(store: SQLiteStore) -> None:
    runs: list[str] = []

    @step()
    def answer(question: str) -> str:
        runs.append(question)
        return f"answer #{len(runs)}"

    alpha, beta = Engine(store, namespace="alpha"), Engine(store, namespace="beta")
    with use_engine(alpha):
        first = answer("q")
    with use_engine(beta):
        other = answer("q")
    assert runs == ["q", "q"] and not other.replayed
    assert (first.value, other.value) == ("answer #1", "answer #2")
    with use_engine(alpha):
        again = answer("q")
        assert answer.explain("q").replay
    with use_engine(beta):
        again_beta = answer("q")
    assert again.replayed and again.value == "answer #1"
    assert again_beta.replayed and again_beta.value == "answer #2"
    assert runs == ["q", "q"]
    with use_engine(beta):
        assert answer.key("q")[0].node_id == other.node_id != first.node_id


def test_async_step_uses_the_namespace_of_its_call(store: SQLiteStore) -> None:
    import asyncio

    runs: list[int] = []

    @step()
    async def slow(x: int) -> int:
        runs.append(x)
        return x * len(runs)

    async def main() -> tuple[Result[int], Result[int]]:
        with use_engine(Engine(store, namespace="alpha")):
            a = await slow(3)
        with use_engine(Engine(store, namespace="beta")):
            b = await slow(3)
        return a, b

    a, b = asyncio.run(main())
    assert runs == [3, 3] and (a.value, b.value) == (3, 6)
    assert _namespace_of(store, b.node_id) == "beta"


def test_replay_by_content_stays_in_its_namespace(store: SQLiteStore) -> None:
    runs: list[str] = []

    @step()
    def source(x: int) -> str:
        return f"text {x}"

    @step()
    def summarize(text: Result[str]) -> str:
        runs.append(text.value)
        return f"summary #{len(runs)}"

    with use_engine(Engine(store, namespace="alpha")):
        summarize(source(1))
    with use_engine(Engine(store, namespace="beta")):
        # Same operation, same input content, other upstream node: never served from alpha.
        beta_summary = summarize(source(1))
    assert runs == ["text 1", "text 1"]
    assert not beta_summary.replayed and beta_summary.value == "summary #2"


def test_clear_forgets_exactly_its_own_namespace(store: SQLiteStore) -> None:
    engines = {ns: Engine(store, namespace=ns) for ns in ("alpha", "beta", "default")}
    for ns, engine in engines.items():
        engine.record(engine.key("chat", "hi"), f"{ns} chat", kind="chat_model")
        engine.record(engine.key("work", 1), f"{ns} work")
    assert engines["alpha"].clear(kinds=("chat_model", "llm")) == 1
    alpha = engines["alpha"]
    assert not alpha.lookup(alpha.key("chat", "hi")).replay
    assert alpha.lookup(alpha.key("work", 1)).value == "alpha work"
    for ns in ("beta", "default"):
        engine = engines[ns]
        assert engine.lookup(engine.key("chat", "hi")).value == f"{ns} chat"
    assert engines["beta"].clear() == 2
    assert not engines["beta"].lookup(engines["beta"].key("work", 1)).replay
    assert engines["default"].lookup(engines["default"].key("work", 1)).value == "default work"


def test_clear_commits_buffered_entries_first(store: SQLiteStore) -> None:
    engine = Engine(store, namespace="alpha")
    key = engine.key("chat", "buffered")
    engine.record(key, "deferred", kind="chat_model", defer=True)
    assert engine.clear() == 1
    assert not engine.lookup(key).replay


def test_clear_never_forgets_an_external_effect(store: SQLiteStore) -> None:
    sent: list[str] = []

    @step(step_type=StepType.EXTERNAL_EFFECT)
    def send(to: str) -> str:
        sent.append(to)
        return f"sent to {to}"

    engine = Engine(store, namespace="alpha")
    with use_engine(engine):
        send("bob")
        engine.clear()
        assert send("bob").replayed
    assert sent == ["bob"]


def test_a_key_of_another_namespace_is_refused(store: SQLiteStore) -> None:
    alpha, beta = Engine(store, namespace="alpha"), Engine(store, namespace="beta")
    key = alpha.key("op", 1)
    alpha.record(key, "alpha's")
    for use in (
        lambda: beta.lookup(key),
        lambda: beta.record(key, "beta's"),
        lambda: beta.record_failure(key, "boom"),
        lambda: beta.explain(key),
        lambda: beta.execute(key, lambda: "beta's"),
    ):
        with pytest.raises(ConfigError, match=r"namespace 'alpha'.*namespace is 'beta'"):
            use()
    assert alpha.lookup(key).value == "alpha's"


@pytest.mark.parametrize(("namespace", "error"), [("", ConfigError), (None, TypeError), (3, TypeError)])
def test_a_namespace_is_a_nonempty_string(
    store: SQLiteStore, namespace: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match="namespace"):
        Engine(store, namespace=namespace)  # type: ignore[arg-type]


def _legacy_row(path: str, node_id: str, namespace: str) -> None:
    """What a musubi without namespaced ids left: ``namespace``'s entry at a default id."""
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE musubi_nodes SET namespace = ? WHERE node_id = ?", (namespace, node_id))
    conn.close()


def test_a_row_of_another_namespace_at_a_default_id_is_never_served(tmp_path: Path) -> None:
    db = str(tmp_path / "m.db")
    runs: list[int] = []

    @step()
    def compute(x: int) -> str:
        runs.append(x)
        return f"run #{len(runs)}"

    with Engine(SQLiteStore(db)) as engine, use_engine(engine):
        first = compute(1)
    _legacy_row(db, first.node_id, "alpha")
    with Engine(SQLiteStore(db)) as engine, use_engine(engine):
        assert not compute.explain(1).replay
        again = compute(1)  # alpha's entry is not the default namespace's
        assert not again.replayed and again.value == "run #2"
        assert engine.store.get_node(first.node_id).namespace == "default"  # type: ignore[union-attr]
        assert compute(1).replayed


def test_an_effect_recorded_in_another_namespace_runs_in_its_own(tmp_path: Path) -> None:
    db = str(tmp_path / "m.db")
    sent: list[str] = []

    @step(step_type=StepType.EXTERNAL_EFFECT)
    def send(to: str) -> str:
        sent.append(to)
        return f"sent #{len(sent)}"

    with Engine(SQLiteStore(db)) as engine, use_engine(engine):
        first = send("bob")
    _legacy_row(db, first.node_id, "alpha")
    with Engine(SQLiteStore(db)) as engine, use_engine(engine):
        assert send("bob").value == "sent #2"  # no EffectInDoubtError: the row was alpha's
        assert send("bob").replayed
    assert sent == ["bob", "bob"]
