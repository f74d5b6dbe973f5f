"""A method's receiver is part of its step's identity (issue 10, "Method receivers").

``Worker("first").echo("x")`` and ``Worker("second").echo("x")`` are different calls: they reach
different nodes, in one process and across processes sharing one SQLite file. Dataclass,
pydantic and attrs receivers enter by their fields, any object by its ``__musubi_identity__()``,
a classmethod's ``cls`` by its qualified name; any other receiver is a ``TypeError`` at the
call, unless the step opts out with ``ignore=("self",)``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from musubi_core import Engine, IdentityError, MusubiError, ReplayReason, step
from musubi_core.decorators import StepFunction
from musubi_core.identity import input_hash, make_node_id, make_op

RunPy = Any  # the run_py fixture of conftest.py


def _node_count(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("SELECT COUNT(*) FROM musubi_nodes").fetchone()[0])
    finally:
        db.close()


@dataclasses.dataclass
class Worker:
    name: str

    @step
    def echo(self, x: str) -> str:
        return f"{self.name}:{x}"


def test_instances_of_a_dataclass_receiver_reach_their_own_nodes(engine: Engine) -> None:
    first = Worker("first").echo("x")
    second = Worker("second").echo("x")
    assert (first.value, second.value) == ("first:x", "second:x")
    assert first.node_id != second.node_id
    assert second.replayed is False
    again = Worker("first").echo("x")  # an equal receiver: the same node, replayed
    assert again.replayed is True and again.value == "first:x"
    assert again.node_id == first.node_id
    # explain() on a bound method and through the class sees the receiver too.
    assert Worker("first").echo.explain("x").reason is ReplayReason.HIT
    assert Worker("third").echo.explain("x").reason is ReplayReason.INPUT_CHANGED
    assert Worker.echo.explain(Worker("second"), "x").replay is True
    assert Worker.echo(Worker("second"), "x").node_id == second.node_id


_WORKERS = """
import dataclasses
from musubi_core import step

CALLS = []

@dataclasses.dataclass
class Worker:
    name: str

    @step
    def echo(self, x: str) -> str:
        CALLS.append(self.name)
        return f"{self.name}:{x}"
"""

_CALL_WORKERS = """
import json, sys
from musubi_core import Engine, SQLiteStore, use_engine
from workers import CALLS, Worker

with Engine(SQLiteStore(sys.argv[1])) as engine, use_engine(engine):
    out = [
        [r.value, r.replayed, r.node_id]
        for r in (Worker(name).echo("x") for name in sys.argv[2:])
    ]
print(json.dumps({"results": out, "calls": CALLS}))
"""


def test_receivers_stay_apart_across_processes_on_one_file(
    run_py: RunPy, parse_json: Any, tmp_path: Path, db_path: Path
) -> None:
    (tmp_path / "workers.py").write_text(_WORKERS)
    one = parse_json(run_py(_CALL_WORKERS, str(db_path), "first"))
    two = parse_json(run_py(_CALL_WORKERS, str(db_path), "second", "first"))
    assert one["calls"] == ["first"] and two["calls"] == ["second"]
    [(value, replayed, first_id)] = one["results"]
    assert (value, replayed) == ("first:x", False)
    (v2, r2, second_id), (v1, r1, again_id) = two["results"]
    assert (v2, r2) == ("second:x", False)
    assert (v1, r1, again_id) == ("first:x", True, first_id)
    assert second_id != first_id
    assert _node_count(db_path) == 2


class Plain:
    def __init__(self, name: str) -> None:
        self.name = name

    @step
    def echo(self, x: str) -> str:
        raise AssertionError("an undeclared receiver must be refused before the body runs")

    @step
    async def aecho(self, x: str) -> str:
        raise AssertionError("an undeclared receiver must be refused before the body runs")

    @step(ignore=("self",))
    def shared(self, x: str) -> str:
        return f"{self.name}:{x}"


def test_an_undeclared_receiver_is_a_type_error_unless_the_step_opts_out(
    engine: Engine, db_path: Path
) -> None:
    with pytest.raises(TypeError) as raised:
        Plain("first").echo("x")
    err = raised.value
    assert isinstance(err, IdentityError) and isinstance(err, MusubiError)
    assert err.path == "$.self"
    message = str(err)
    for fix in ("Plain", "Plain.echo", "dataclass", "pydantic", "__musubi_identity__"):
        assert fix in message, fix
    assert "@step(ignore=('self',))" in message
    with pytest.raises(TypeError, match="__musubi_identity__"):
        Plain.echo(Plain("first"), "x")
    with pytest.raises(TypeError, match="__musubi_identity__"):
        Plain("first").echo.explain("x")
    # An async method refuses at the call too: no coroutine is ever made.
    with pytest.raises(TypeError, match="__musubi_identity__"):
        Plain("first").aecho("x")
    engine.flush()
    assert _node_count(db_path) == 0

    # ignore=("self",): one node shared by every instance, as the step declares.
    first = Plain("first").shared("x")
    second = Plain("second").shared("x")
    assert first.value == "first:x"
    assert second.replayed is True and second.value == "first:x"
    # Exactly the identity a method had before receivers entered it: stores keep replaying.
    assert first.node_id == make_node_id(_op_of(Plain, "shared"), input_hash({"x": "x"}))


CATALOG_CALLS: Counter[str] = Counter()


class Catalog:
    @classmethod
    @step
    def load(cls, name: str) -> str:
        CATALOG_CALLS[cls.__name__] += 1
        return f"{cls.__name__}:{name}"

    @step
    @classmethod
    def build(cls, name: str) -> str:
        CATALOG_CALLS["build-" + cls.__name__] += 1
        return f"{cls.__name__}:{name}"

    @step
    @staticmethod
    def shout(text: str) -> str:
        return text.upper()

    @staticmethod
    @step
    def whisper(text: str) -> str:
        return text.lower()


class Shelf(Catalog):
    pass


def test_a_classmethods_cls_enters_by_qualified_name(engine: Engine) -> None:
    for method in ("load", "build"):  # @classmethod over @step, and @step over @classmethod
        base = getattr(Catalog, method)("a")
        sub = getattr(Shelf, method)("a")
        assert (base.value, sub.value) == ("Catalog:a", "Shelf:a")
        assert base.node_id != sub.node_id
        via_instance = getattr(Shelf(), method)("a")
        assert via_instance.replayed is True and via_instance.node_id == sub.node_id
        cls_form = ["class", f"{Catalog.__module__}:Catalog"]
        expected = input_hash({"cls": cls_form, "name": "a"})
        assert base.node_id == make_node_id(_op_of(Catalog, method), expected)
    assert dict(CATALOG_CALLS) == {"Catalog": 1, "Shelf": 1, "build-Catalog": 1, "build-Shelf": 1}
    assert Shelf.build.explain("a").reason is ReplayReason.HIT


def _op_of(cls: type, method: str) -> str:
    """The op of the step defined as ``cls.method`` (under a classmethod or not)."""
    descriptor = cls.__dict__[method]
    step_fn = descriptor.__func__ if isinstance(descriptor, classmethod) else descriptor
    assert isinstance(step_fn, StepFunction)
    return make_op(step_fn.name, step_fn.fingerprint)


def test_a_staticmethod_has_no_receiver(engine: Engine) -> None:
    on_class = Catalog.shout("hi")
    on_instance = Shelf().shout("hi")
    assert on_class.value == on_instance.value == "HI"
    assert on_instance.replayed is True and on_instance.node_id == on_class.node_id
    assert Catalog().whisper("HI").value == "hi"
    # Identity is the arguments alone, as for a function.
    assert on_class.node_id == make_node_id(_op_of(Catalog, "shout"), input_hash({"text": "hi"}))


class Settings(BaseModel):
    # pydantic refuses class attributes it does not know; a step is a method.
    model_config = ConfigDict(ignored_types=(StepFunction,))

    model: str
    temperature: float = 0.0

    @step
    def ask(self, prompt: str) -> str:
        return f"{self.model}@{self.temperature}:{prompt}"


class Keyed:
    """Identity by a declared method: the client is left out on purpose."""

    def __init__(self, model: str, client: object) -> None:
        self.model, self.client = model, client

    def __musubi_identity__(self) -> Any:
        return {"model": self.model, "version": (1, 2)}

    @step
    def ask(self, prompt: str) -> str:
        return f"{self.model}:{prompt}"


def test_pydantic_and_declared_receivers(engine: Engine) -> None:
    a = Settings(model="m1").ask("q")
    b = Settings(model="m1", temperature=0.5).ask("q")
    c = Settings(model="m1").ask("q")
    assert (a.value, b.value) == ("m1@0.0:q", "m1@0.5:q")
    assert a.node_id != b.node_id and c.replayed is True and c.node_id == a.node_id

    k1 = Keyed("m1", object()).ask("q")
    k2 = Keyed("m1", object()).ask("q")  # another client, same declared identity
    k3 = Keyed("m2", object()).ask("q")
    assert k2.replayed is True and k2.node_id == k1.node_id
    assert k3.value == "m2:q" and k3.node_id != k1.node_id


def test_attrs_receivers_enter_by_their_fields(engine: Engine) -> None:
    import attrs  # a dev dependency; musubi itself never imports it

    @attrs.define
    class Model:
        name: str
        size: int = 1

        @step
        def run(self, x: int) -> str:
            return f"{self.name}/{self.size}:{x}"

    a, b = Model("a").run(1), Model("a", 2).run(1)
    assert (a.value, b.value) == ("a/1:1", "a/2:1")
    assert a.node_id != b.node_id
    assert Model("a").run(1).replayed is True


def test_attrs_is_detected_without_importing_it(run_py: RunPy, parse_json: Any) -> None:
    code = """
    import json, sys
    from musubi_core import Engine, SQLiteStore, step, use_engine

    class Field:
        def __init__(self, name): self.name = name

    class Like:  # what attrs puts on a class, without attrs
        __attrs_attrs__ = (Field("name"),)
        def __init__(self, name): self.name = name

        @step
        def run(self, x):
            return f"{self.name}:{x}"

    with Engine(SQLiteStore("m.db")) as engine, use_engine(engine):
        a, b = Like("a").run(1), Like("b").run(1)
    print(json.dumps([a.value, b.value, a.node_id != b.node_id,
                      "attr" in sys.modules or "attrs" in sys.modules]))
    """
    assert parse_json(run_py(code)) == ["a:1", "b:1", True, False]


def test_a_receiver_whose_fields_change_gets_a_new_node(engine: Engine) -> None:
    w = Worker("ann")
    first = w.echo("bo")
    w.name = "cy"
    renamed = w.echo("bo")
    assert renamed.replayed is False and renamed.value == "cy:bo"
    assert renamed.node_id != first.node_id
    w.name = "ann"  # back to the first receiver's fields: its node again
    back = w.echo("bo")
    assert back.replayed is True and back.value == "ann:bo"
    assert back.node_id == first.node_id


def test_a_receiver_field_without_identity_names_the_path_and_the_fixes(engine: Engine) -> None:
    @dataclasses.dataclass
    class WithClient:
        model: str
        client: object

        @step
        def ask(self, q: str) -> str:
            return q

    with pytest.raises(TypeError) as raised:
        WithClient("m", object()).ask("q")
    err = raised.value
    assert isinstance(err, IdentityError) and err.path == "$.self.client"
    assert "__musubi_identity__" in str(err) and "ignore=('self',)" in str(err)


@dataclasses.dataclass
class Speaker:
    name: str

    def say(self, x: str) -> str:  # not a step: wrapped below, bound or through a partial
        return f"{self.name}:{x}"


class Mute:
    def say(self, x: str) -> str:
        raise AssertionError("an undeclared receiver must be refused before the body runs")


def test_bound_methods_and_partials_carry_their_receiver(engine: Engine) -> None:
    first, second = step(Speaker("first").say), step(Speaker("second").say)
    a, b = first("x"), second("x")
    assert (a.value, b.value) == ("first:x", "second:x") and a.node_id != b.node_id
    assert step(Speaker("first").say)("x").replayed is True

    p1 = step(functools.partial(Speaker.say, Speaker("p1")))
    p2 = step(functools.partial(Speaker.say, Speaker("p2")))
    assert p1.fingerprint == p2.fingerprint  # the receiver enters per call, not in the op
    assert (p1("y").value, p2("y").value) == ("p1:y", "p2:y")
    assert p1("y").node_id != p2("y").node_id and p1("y").replayed is True

    with pytest.raises(TypeError, match="__musubi_identity__"):
        step(Mute().say)("x")
    with pytest.raises(TypeError, match="__musubi_identity__"):
        step(functools.partial(Mute.say, Mute()))("x")


@dataclasses.dataclass
class AsyncWorker:
    name: str

    @step
    async def echo(self, x: str) -> str:
        await asyncio.sleep(0)
        return f"{self.name}:{x}"


def test_async_methods_enter_their_receiver(engine: Engine) -> None:
    async def main() -> list[Any]:
        return list(
            await asyncio.gather(AsyncWorker("first").echo("x"), AsyncWorker("second").echo("x"))
        )

    first, second = asyncio.run(main())
    assert (first.value, second.value) == ("first:x", "second:x")
    assert first.node_id != second.node_id
    again = asyncio.run(AsyncWorker("second").echo("x"))
    assert again.replayed is True and again.value == "second:x"
