"""A step remembers the keys of calls made with short strings, ints and None: a remembered key
is always the key the call would compute (confusable values such as 1, True, 1.0 and "1" never
share one), and whatever else enters a node's identity (the engine's namespace, a renamed step,
a mutable default, a long string) is still honoured. Real engines on real SQLite files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from musubi_core import SQLiteStore, step
from musubi_core.engine import Engine, use_engine

_ARGS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=3),
    st.floats(min_value=-2, max_value=2, allow_nan=False).map(lambda f: f if f else -0.0),
    st.sampled_from(["", "1", "0", "true", "None", "x" * 300]),
)


def _pair(x: Any, y: Any = 0) -> str:
    return f"{x!r} {y!r}"


def test_a_remembered_key_is_the_key_the_call_computes(tmp_path: Path) -> None:
    engine = Engine(SQLiteStore(str(tmp_path / "m.db")))
    shared = step(engine=engine, name="demo.pair")(_pair)  # remembers keys across examples

    @settings(max_examples=300, deadline=None)
    @given(st.lists(_ARGS, min_size=1, max_size=2), st.booleans())
    def check(args: list[Any], by_name: bool) -> None:
        fresh = step(engine=engine, name="demo.pair")(_pair)  # nothing remembered
        expected = fresh.key(*args)
        if by_name:  # the same call, its arguments passed by name
            named = dict(zip(("x", "y"), args, strict=False))
            assert shared.key(**named) == expected
            assert shared.key(**named) == expected
        assert shared.key(*args) == expected
        assert shared.key(*args) == expected  # the second answer, remembered when it may be

    check()
    engine.close()


def test_confusable_arguments_reach_distinct_nodes_and_each_replays(tmp_path: Path) -> None:
    engine = Engine(SQLiteStore(str(tmp_path / "m.db")))
    runs: list[Any] = []

    @step(engine=engine, name="demo.echo")
    def echo(x: Any) -> str:
        runs.append(x)
        return repr(x)

    values: list[Any] = [1, True, 1.0, "1", None, "None"]
    first = [echo(v) for v in values]
    again = [echo(v) for v in values]
    assert runs == values  # six executions, then six replays
    assert len({r.node_id for r in first}) == len(values)
    assert [r.node_id for r in again] == [r.node_id for r in first]
    assert all(r.replayed for r in again)
    assert [r.value for r in again] == [repr(v) for v in values]
    engine.close()


def test_the_engines_namespace_and_a_renamed_step_still_decide_the_node(tmp_path: Path) -> None:
    path = str(tmp_path / "m.db")
    default, other = Engine(SQLiteStore(path)), Engine(SQLiteStore(path), namespace="other")

    @step(name="demo.ns")
    def double(x: int) -> int:
        return 2 * x

    with use_engine(default):
        a = double(3).node_id
        assert double(3).node_id == a
    with use_engine(other):
        b = double(3).node_id
    assert b != a  # the remembered key of the default namespace was not used
    double.name = "demo.renamed"
    with use_engine(default):
        c = double(3).node_id
    assert c not in (a, b)
    other.close()
    default.close()


def test_a_mutable_default_still_enters_the_identity(tmp_path: Path) -> None:
    engine = Engine(SQLiteStore(str(tmp_path / "m.db")))
    options: list[str] = []

    def configured(x: int, opts: list[str] = options) -> str:
        return f"{x} {opts}"

    fn = step(engine=engine, name="demo.defaults")(configured)
    before = fn(1)
    assert fn(1).replayed
    options.append("verbose")  # the default changed: another call
    after = fn(1)
    assert after.node_id != before.node_id and not after.replayed
    assert after.value == "1 ['verbose']"
    engine.close()
