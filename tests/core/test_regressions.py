"""Regression tests for the defects found in the core review (one test per
defect, named after what it protects), plus the method / ``ignore`` /
``functools.partial`` / generator behaviour of ``@step``.

Every test runs against a real SQLite file in ``tmp_path``; the cross-process
ones use real subprocesses or ``os.fork``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import itertools
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from pydantic import BaseModel, Field

import musubi_core.engine as engine_module
from musubi_core import (
    DecodeError,
    EffectInDoubtError,
    Engine,
    JSONCodec,
    ReplayReason,
    Result,
    SchemaError,
    SerializationError,
    SQLiteStore,
    StepConfiguration,
    StepType,
    StoreError,
    allow,
    merge,
    step,
    use_engine,
)
from musubi_core.identity import IdentityError, canonical_bytes, input_hash
from musubi_core.store import NodeWrite
from tests.support.tamper import readdress

ROOT = Path(__file__).resolve().parents[2]
STOCHASTIC = StepType.STOCHASTIC
EFFECT = StepType.EXTERNAL_EFFECT


def subprocess_env(**extra: str) -> dict[str, str]:
    """This checkout importable in a child interpreter; MUSUBI_DB unset."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("MUSUBI_DB", None)
    env.update(extra)
    return env


def _sql(path: str | Path, statement: str, *params: Any) -> None:
    """Tamper with the store file the way another tool would."""
    db = sqlite3.connect(path)
    try:
        db.execute(statement, params)
        db.commit()
    finally:
        db.close()


def _in_thread(fn: Any, timeout: float = 10.0) -> dict[str, Any]:
    """Run ``fn`` in a thread; report its result or exception, and whether it
    was still running after ``timeout`` (a busy loop)."""
    out: dict[str, Any] = {}

    def go() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(timeout)
    out["alive"] = t.is_alive()
    return out


# -- r01: binding and edge inputs ----------------------------------------------------


def test_keyword_positional_and_default_calls_share_one_node(engine: Engine) -> None:
    calls = Counter[int]()

    @step
    def add(x: int, y: int = 2) -> int:
        calls[x] += 1
        return x + y

    results = [add(1), add(x=1), add(1, 2), add(1, y=2)]
    assert len({r.node_id for r in results}) == 1
    assert [r.replayed for r in results] == [False, True, True, True]
    assert calls[1] == 1
    # Edge inputs: huge ints fail with the typed errors, lone surrogates are
    # hashable and storable, -0.0 and 0.0 stay distinct.
    with pytest.raises(IdentityError):
        canonical_bytes(10**5000)
    with pytest.raises(SerializationError):
        JSONCodec().encode(10**5000)
    lone = b"caf\xe9".decode("utf-8", "surrogateescape")
    assert input_hash(lone) != input_hash("caf\xe9")
    codec = JSONCodec()
    assert codec.decode(*codec.encode(lone)) == lone
    assert input_hash(-0.0) != input_hash(0.0)
    assert canonical_bytes({"$float": "1.0"}) != canonical_bytes(1.0)


# -- r02: codec round trips ------------------------------------------------------------


class _Point(NamedTuple):
    x: int
    y: int


class _Aliased(BaseModel):
    a: int = Field(alias="A")


@dataclasses.dataclass
class _Doubling:
    x: int

    def __post_init__(self) -> None:
        self.x = self.x * 2


def test_codec_round_trip_keeps_namedtuple_alias_model_and_post_init_value() -> None:
    allow(_Point, _Aliased, _Doubling)
    codec = JSONCodec()
    for value in (_Point(1, 2), _Aliased(A=1), _Doubling(1)):
        out = codec.decode(*codec.encode(value))
        assert type(out) is type(value)
        assert out == value, f"{value!r} came back as {out!r}"
    assert codec.decode(*codec.encode(_Doubling(1))).x == 2


# -- r03: an effect whose stored result is lost ------------------------------------------


@pytest.mark.parametrize("damage", ["corrupt", "deleted"])
def test_effect_with_lost_result_raises_in_doubt_instead_of_spinning(
    engine: Engine, damage: str
) -> None:
    sent: list[int] = []

    @step(step_type=EFFECT)
    def send(x: int) -> dict[str, int]:
        sent.append(x)
        return {"sent": x}

    first = send(1)
    engine.flush()
    if damage == "corrupt":
        _sql(
            engine.store.path,
            "UPDATE musubi_artifacts SET payload = X'7b7d7b' WHERE artifact_id = ?",
            first.artifact_id,
        )
    else:
        _sql(
            engine.store.path,
            "DELETE FROM musubi_artifacts WHERE artifact_id = ?",
            first.artifact_id,
        )

    def again() -> Any:
        with use_engine(engine):
            return send(1)

    with pytest.warns(RuntimeWarning) if damage == "corrupt" else _nothing():
        out = _in_thread(again, timeout=10)
    assert out["alive"] is False, "the second call is busy-looping"
    assert isinstance(out.get("error"), EffectInDoubtError)
    assert out["error"].reason == "lost"
    assert sent == [1]


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# -- r04: waiting for another process's effect ----------------------------------------


def test_sync_and_async_effect_waits_end_at_the_deadline(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "EFFECT_WAIT_SECONDS", 1.0)

    @step(step_type=EFFECT)
    def send(x: int) -> int:
        return x

    @step(step_type=EFFECT)
    async def asend(x: int) -> int:
        return x

    for fn in (send, asend):
        key, _ = fn.key(1)
        # A live process of this host (pid 1) holds the intent row.
        engine.store.write(
            [
                NodeWrite(
                    node_id=key.node_id,
                    op=key.op,
                    op_name=key.op_name,
                    kind="step",
                    step_type="external_effect",
                    input_hash=key.input_hash,
                    status="pending",
                    started_at=time.time(),
                    owner=f"{engine_module._HOST}:1:abc:1",
                    executed=0,
                )
            ]
        )

    t0 = time.monotonic()
    with pytest.raises(EffectInDoubtError) as sync_err:
        send(1)
    assert sync_err.value.reason == "timeout"
    assert 0.9 <= time.monotonic() - t0 < 4

    async def main() -> float:
        t0 = time.monotonic()
        with pytest.raises(EffectInDoubtError) as async_err:
            await asyncio.wait_for(asend(1), 5)
        assert async_err.value.reason == "timeout"
        return time.monotonic() - t0

    assert 0.9 <= asyncio.run(main()) < 4


# -- r05: merge() parents -----------------------------------------------------------------


def test_merge_parent_with_new_output_reaches_a_new_child_node(engine: Engine) -> None:
    counter = itertools.count()
    built: list[str] = []

    @step(step_type=STOCHASTIC)
    def sample(prompt: str) -> str:
        return f"{prompt}-{next(counter)}"

    @step
    def summarise(tag: str) -> str:
        built.append(tag)
        return f"{tag}: built"

    forced = step(
        semantics=StepConfiguration(step_type=STOCHASTIC, force_reexecution=True), name=sample.name
    )(sample.fn)
    p1 = sample("q")
    with merge(p1):
        c1 = summarise("t")
    p2 = forced("q")
    assert p2.node_id == p1.node_id and p2.value != p1.value
    with merge(p2):
        c2 = summarise("t")
    assert c2.replayed is False
    assert c2.node_id != c1.node_id
    assert built == ["t", "t"]
    with merge(p2):
        assert summarise("t").replayed is True
    assert built == ["t", "t"]


# -- r06: Results nested in containers ------------------------------------------------------


@dataclasses.dataclass
class _Req:
    doc: Result[int]
    n: int


class _Pair(NamedTuple):
    doc: Result[int]
    n: int


def test_results_nested_in_dataclass_namedtuple_and_mappings_are_upstream(
    engine: Engine,
) -> None:
    @step
    def load(x: int) -> int:
        return x * 10

    @step
    def use_dc(req: _Req) -> int:
        return req.doc.value + req.n

    @step
    def use_nt(p: _Pair) -> int:
        return p.doc.value + p.n

    @step
    def use_od(d: collections.OrderedDict[str, Result[int]]) -> int:
        return d["doc"].value

    @step
    def use_plain(d: dict[str, Result[int]]) -> int:
        return d["doc"].value

    a = load(1)
    children = [
        use_dc(_Req(a, 1)),
        use_nt(_Pair(a, 1)),
        use_od(collections.OrderedDict(doc=a)),
        use_plain({"doc": a}),
    ]
    engine.flush()
    for child in children:
        data = [e for e in engine.store.edges(child.node_id) if e.kind == "data"]
        assert [e.parent for e in data] == [a.node_id], child
    assert engine.invalidate(a.node_id) == 5
    for child in children:
        assert engine.store.get_node(child.node_id).status == "stale"
    assert use_dc(_Req(a, 1)).replayed is False


# -- r07: methods, partials, generators, ignore= ------------------------------------------


def test_step_on_a_method_ignoring_self_shares_the_node_across_instances(engine: Engine) -> None:
    calls = Counter[int]()

    @dataclasses.dataclass
    class Svc:
        k: int

        @step(ignore=("self",))
        def run(self, x: int) -> int:
            calls[x] += 1
            return x + self.k

    first = Svc(1).run(2)
    assert first.value == 3 and first.replayed is False
    # self opted out of identity: another instance reaches the same node.
    second = Svc(100).run(2)
    assert second.node_id == first.node_id
    assert second.replayed is True and second.value == 3
    assert calls[2] == 1
    decision = Svc(1).run.explain(2)
    assert decision.replay is True and decision.reason is ReplayReason.HIT
    assert Svc(1).run.explain(3).replay is False
    assert Svc.run(Svc(1), 2).node_id == first.node_id


def test_step_ignore_keeps_a_client_out_of_identity(engine: Engine) -> None:
    calls: list[str] = []

    class Client:
        def __init__(self, name: str) -> None:
            self.name = name

    @step(ignore=("client",))
    def ask(client: Client, prompt: str) -> str:
        calls.append(client.name)
        return prompt.upper()

    a = ask(Client("one"), "hi")
    b = ask(Client("two"), "hi")
    c = ask(Client("one"), "bye")
    assert a.node_id == b.node_id and b.replayed is True
    assert c.node_id != a.node_id
    assert calls == ["one", "one"]
    with pytest.raises(TypeError, match="ignore"):
        step(ignore=("nope",))(lambda x: x)


def _base(a: int, b: int) -> int:
    return a + b


def test_step_over_functools_partial_named_after_wrapped_function(engine: Engine) -> None:
    plus_one = step(functools.partial(_base, 1))
    plus_two = step(functools.partial(_base, 2))
    assert plus_one.name == f"{__name__}._base" == plus_two.name
    r1, r2 = plus_one(10), plus_two(10)
    assert (r1.value, r2.value) == (11, 12)
    assert r1.node_id != r2.node_id
    assert plus_one(10).replayed is True
    engine.flush()
    assert engine.store.get_node(r1.node_id).label == "_base"


def test_generator_functions_are_rejected_at_decoration() -> None:
    def gen(n: int) -> Any:
        yield from range(n)

    async def agen(n: int) -> Any:
        for i in range(n):
            yield i

    with pytest.raises(TypeError, match="generator"):
        step(gen)
    with pytest.raises(TypeError, match="generator"):
        step(step_type=STOCHASTIC)(agen)


def test_async_step_is_seen_as_a_coroutine_function(engine: Engine) -> None:
    @step
    async def af(x: int) -> int:
        return x

    result = asyncio.run(af(1))
    assert result.value == 1 and af.is_async
    if sys.version_info >= (3, 12):  # inspect.markcoroutinefunction exists
        import inspect

        assert inspect.iscoroutinefunction(af)


# -- r08: tampered artifacts ------------------------------------------------------------------


def test_tampered_artifacts_are_recomputed_not_crashes(engine: Engine) -> None:
    runs: list[int] = []

    @step
    def price(x: int) -> object:
        runs.append(x)
        return {"p": 1}

    first = price(1)
    engine.flush()
    payloads = [
        json.dumps({"$decimal": "not-a-number"}).encode(),
        json.dumps({"$timedelta": [10**12, 0, 0]}).encode(),
        b"[" * 200_000 + b"]" * 200_000,
    ]
    for n, raw in enumerate(payloads, start=2):
        # Stored under its own content id, so it passes the content-id check: the decoder
        # must refuse it.
        readdress(engine.store.path, first.artifact_id, payload=raw)
        with pytest.warns(RuntimeWarning, match="could not be decoded"):
            out = price(1)
        assert out.replayed is False and out.value == {"p": 1}
        assert len(runs) == n
    engine.flush()
    _sql(
        engine.store.path,
        "UPDATE musubi_artifacts SET payload = ? WHERE artifact_id = ?",
        b'{"$decimal":"x"}',
        first.artifact_id,
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "musubi_core.cli",
            "--db",
            engine.store.path,
            "show",
            first.node_id[:12],
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


# -- r09: dataclass decode ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Order:
    amount: int
    approved: bool = False

    def __post_init__(self) -> None:
        if self.amount < 0:
            raise ValueError("negative")


def test_dataclass_decode_rejects_unknown_fields_and_runs_validation() -> None:
    allow(_Order)
    codec = JSONCodec()
    encoding, payload = codec.encode(_Order(5))
    tree = json.loads(payload)
    tree["fields"] = {"amount": 5, "__dict__": {"amount": -100, "approved": True}}
    with pytest.raises(DecodeError, match="__dict__"):
        codec.decode(encoding, json.dumps(tree).encode())
    tree["fields"] = {"amount": -100, "approved": True}
    with pytest.raises(DecodeError):
        codec.decode(encoding, json.dumps(tree).encode())
    assert codec.decode(encoding, payload) == _Order(5)


# -- r10: foreign and newer files are left untouched -------------------------------------------


def test_foreign_or_newer_database_is_rejected_untouched(tmp_path: Path) -> None:
    foreign = tmp_path / "app" / "app.db"
    foreign.parent.mkdir()
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE users(id INTEGER)")
    db.commit()
    db.close()
    newer = tmp_path / "new" / "new.db"
    newer.parent.mkdir()
    db = sqlite3.connect(newer)
    db.execute("CREATE TABLE musubi_meta(key TEXT PRIMARY KEY, value TEXT)")
    db.execute("INSERT INTO musubi_meta VALUES('schema_version', '99')")
    db.commit()
    db.close()
    for path in (foreign, newer):
        with pytest.raises(SchemaError):
            SQLiteStore(path)
        db = sqlite3.connect(path)
        try:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        finally:
            db.close()
        assert sorted(os.listdir(path.parent)) == [path.name]


# -- r11: deferred writes and invalidation ----------------------------------------------------


def test_invalidate_reaches_nodes_still_in_another_engines_buffer(db_path: Path) -> None:
    e1 = Engine(SQLiteStore(db_path))
    e2 = Engine(SQLiteStore(db_path))
    try:
        k = e1.key("llm.call", {"prompt": "hi"})
        e1.record(k, "old answer", defer=True)
        assert e2.invalidate(k.node_id) == 1
        assert e2.store.get_node(k.node_id).status == "stale"
        assert e1.lookup(k).replay is False
        e1.flush()
        assert e2.store.get_node(k.node_id).status == "stale"

        p = e1.key("parent", 1)
        e1.record(p, 1)
        c = e1.key("child", 2, upstream=[p.node_id])
        e1.record(c, "x", defer=True, upstream_artifacts={})
        assert e2.invalidate(p.node_id) == 2
        e1.flush()
        assert e2.store.get_node(c.node_id).status == "stale"
        assert e2.store.get_node(p.node_id).status == "stale"
    finally:
        e1.close()
        e2.close()


# -- r12: early cutoff racing an invalidation ---------------------------------------------------


def test_early_cutoff_does_not_revive_a_child_whose_parent_was_invalidated_again(
    engine: Engine,
) -> None:
    runs: list[int] = []

    @step
    def a(x: int) -> int:
        return x

    @step
    def b(r: Result[int]) -> int:
        runs.append(r.value)
        return r.value + 1

    other = SQLiteStore(engine.store.path)  # another process running `musubi invalidate`
    try:
        ra = a(1)
        b(ra)
        engine.flush()
        engine.invalidate(ra.node_id)
        ra2 = a(1)  # same output: b may cut off early...
        real = engine.store.data_parents

        def racing(node_id: str) -> Any:
            parents = real(node_id)  # ...the parents look unchanged...
            other.invalidate(ra.node_id)  # ...then `a` is invalidated again
            return parents

        engine.store.data_parents = racing  # type: ignore[method-assign]
        try:
            rb2 = b(ra2)
        finally:
            engine.store.data_parents = real  # type: ignore[method-assign]
        assert rb2.replayed is False
        assert runs == [1, 1]
        engine.flush()
        assert engine.store.get_node(ra.node_id).status == "stale"
        # The store-level revival re-checks the parents in its transaction.
        assert engine.store.get_node(rb2.node_id).status == "done"
        engine.invalidate(ra.node_id)
        assert engine.store.mark_fresh(rb2.node_id) is False
        assert engine.store.get_node(rb2.node_id).status == "stale"
    finally:
        other.close()


# -- r13: an effect whose outcome cannot be recorded --------------------------------------------


def test_effect_outcome_that_cannot_be_recorded_is_never_repeated(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "EFFECT_WAIT_SECONDS", 5.0)
    sent: list[str] = []

    @step(step_type=EFFECT)
    def send(path: str) -> str:
        sent.append(path)
        return os.fsdecode(b"/tmp/caf\xe9")  # a lone surrogate: stored as-is

    assert send("a").replayed is False
    again = send("a")
    assert again.replayed is True and again.value == os.fsdecode(b"/tmp/caf\xe9")
    assert sent == ["a"]

    @step(step_type=EFFECT)
    def big(x: int) -> int:
        sent.append(f"big{x}")
        return 10**5000  # cannot be encoded

    with pytest.raises(SerializationError) as err:
        big(1)
    assert err.value.value == 10**5000
    node = engine.store.get_node(big.key(1)[0].node_id)
    assert node.status == "pending" and node.owner is None
    t0 = time.monotonic()
    with pytest.raises(EffectInDoubtError) as doubt:
        big(1)
    assert doubt.value.reason == "died"
    assert time.monotonic() - t0 < 2, "waited for an owner that is gone"

    def other_thread() -> Any:
        with use_engine(engine):
            return big(1)

    out = _in_thread(other_thread, timeout=10)
    assert out["alive"] is False and isinstance(out.get("error"), EffectInDoubtError)
    assert sent.count("big1") == 1

    @step(step_type=EFFECT)
    def pay(x: int) -> str:
        sent.append(f"pay{x}")
        return "ok"

    real = engine.store.write

    def flaky(*args: Any, **kwargs: Any) -> None:
        raise StoreError("disk I/O error (simulated)")

    engine.store.write = flaky  # type: ignore[method-assign]
    try:
        with pytest.raises(StoreError):
            pay(1)
    finally:
        engine.store.write = real  # type: ignore[method-assign]
    t0 = time.monotonic()
    with pytest.raises(EffectInDoubtError):
        pay(1)
    assert time.monotonic() - t0 < 2
    assert sent.count("pay1") == 1


# -- r14: default store path and chdir ----------------------------------------------------------


def test_default_store_path_survives_chdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d1, d2 = tmp_path / "one", tmp_path / "two"
    d1.mkdir()
    d2.mkdir()
    monkeypatch.delenv("MUSUBI_DB", raising=False)
    monkeypatch.setattr(engine_module, "_DEFAULT", None)
    monkeypatch.chdir(d1)
    calls: list[int] = []

    @step
    def f(x: int) -> int:
        calls.append(x)
        return x

    try:
        assert f(1).replayed is False
        default = engine_module.get_engine()
        assert default.store.path == str(d1 / ".musubi" / "musubi.db")
        monkeypatch.chdir(d2)
        assert f(2).replayed is False
        out = _in_thread(lambda: f(1).replayed)
        assert out == {"value": True, "alive": False}
        assert calls == [1, 2]
        assert not (d2 / ".musubi").exists()
    finally:
        if engine_module._DEFAULT is not None:
            engine_module._DEFAULT.close()


# -- r15: fork and the write-behind buffer -------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_does_not_replay_the_parents_buffer(engine: Engine) -> None:
    k = engine.key("embed", "text")
    engine.record(k, [0.1])
    assert engine.lookup(k).replay and engine.lookup(k).replay  # 2 buffered replays
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            engine.flush()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    engine.flush()
    assert engine.store.get_node(k.node_id).replay_count == 2


# -- r16: TTL changes apply to stored results ------------------------------------------------------


def test_shortened_ttl_and_new_stochastic_type_apply_to_stored_results(
    engine: Engine, clock: Any
) -> None:
    long = StepConfiguration(step_type=STOCHASTIC, ttl_seconds=86400)
    short = StepConfiguration(step_type=STOCHASTIC, ttl_seconds=1)
    k = engine.key("chat", "hello")
    engine.record(k, "v1", long)
    k2 = engine.key("chat", "bye")
    engine.record(k2, "v1")  # recorded while the step was DETERMINISTIC
    assert engine.lookup(k, short).replay is True
    clock.advance(1.2)
    assert engine.lookup(k, long).replay is True
    for key in (k, k2):
        found = engine.lookup(key, short)
        assert found.replay is False
        assert found.decision.reason is ReplayReason.TTL_EXPIRED


# -- r17: deferred write vs direct write --------------------------------------------------------


def test_direct_write_supersedes_a_buffered_write_of_the_same_node(engine: Engine) -> None:
    force = StepConfiguration(force_reexecution=True)
    k = engine.key("llm", "p")
    engine.record(k, "old", defer=True)
    assert engine.execute(k, lambda: "new", force).value == "new"
    assert engine.lookup(k).value == "new"
    engine.flush()
    assert engine.lookup(k).value == "new"
    assert engine.store.get_node(k.node_id).status == "done"

    k2 = engine.key("llm", "q")
    engine.record(k2, "ok", defer=True)
    with pytest.raises(ZeroDivisionError):
        engine.execute(k2, lambda: 1 / 0, force)
    engine.flush()
    assert engine.store.get_node(k2.node_id).status == "failed"
    assert engine.lookup(k2).replay is False


# -- r18: fingerprints across Python versions --------------------------------------------------

_FP_SAMPLE = '''
def plain(x, y=2):
    """doc"""
    return x + y
def fstr(name):
    return f"hello {name!r} and {{braces}} {name}"
def fstr_spec(v, w):
    return f"{v:>{w}.2f}|{v=}"
def nested_fstr(d):
    return f"{'a' + f'{d}'}"
def matcher(cmd):
    match cmd:
        case {"op": op, **rest}:
            return op
        case [1, *others]:
            return others
        case _:
            return None
def generic_ann(x: "list[int]") -> dict[str, int]:
    return {"n": len(x)}
def concat(x):
    return ("abc" f"d{x}e" "fg" f"{x!r:>10}" f"{x:%Y-%m-%d}")
def only_doc():
    """only a docstring"""
def fmt_nested(x):
    return f"{x:{'>'}10}{x:{x}}"
'''

_FP_PRINT = """
import json, fp_sample
from musubi_core.identity import function_fingerprint
names = [n for n in dir(fp_sample) if not n.startswith("_")]
print(json.dumps({n: function_fingerprint(getattr(fp_sample, n)) for n in names}))
"""

_OTHER_PYTHONS = ["/tmp/v3.10.13/bin/python", "/tmp/v3.12.1/bin/python", "/tmp/v3.13.0/bin/python"]


def _usable(python: str) -> bool:
    if not os.path.exists(python):
        return False
    probe = subprocess.run([python, "-c", "import pydantic"], capture_output=True, timeout=60)
    return probe.returncode == 0


def test_code_fingerprints_agree_across_python_versions(tmp_path: Path) -> None:
    others = [p for p in _OTHER_PYTHONS if _usable(p)]
    if not others:
        pytest.skip("no other Python interpreter with pydantic available")
    (tmp_path / "fp_sample.py").write_text(_FP_SAMPLE)
    env = subprocess_env(PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]))
    results: dict[str, dict[str, str]] = {}
    for python in [sys.executable, *others]:
        proc = subprocess.run(
            [python, "-c", _FP_PRINT],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        results[python] = json.loads(proc.stdout.strip().splitlines()[-1])
    mine = results[sys.executable]
    assert len(mine) == 9
    for python, theirs in results.items():
        assert theirs == mine, f"{python} disagrees"


# -- r19: early cutoff still applies every replay check -------------------------------------------


def test_early_cutoff_respects_ttl_and_missing_artifacts(engine: Engine, clock: Any) -> None:
    chats: list[int] = []
    doubles: list[int] = []

    @step
    def a(x: int) -> int:
        return x

    @step(step_type=STOCHASTIC, ttl_seconds=1)
    def chat(r: Result[int]) -> str:
        chats.append(r.value)
        return f"answer to {r.value}"

    @step
    def b(r: Result[int]) -> int:
        doubles.append(r.value)
        return r.value * 2

    ra = a(1)
    chat(ra)
    rb = b(ra)
    engine.flush()
    clock.advance(1.3)
    assert chat.explain(ra).reason is ReplayReason.TTL_EXPIRED
    engine.invalidate(ra.node_id)
    ra2 = a(1)  # identical output: children may cut off early...
    assert ra2.artifact_id == ra.artifact_id
    assert chat(ra2).replayed is False  # ...but the TTL has expired
    assert chats == [1, 1]

    engine.invalidate(ra.node_id)
    _sql(engine.store.path, "DELETE FROM musubi_artifacts WHERE artifact_id = ?", rb.artifact_id)
    ra3 = a(1)
    rb3 = b(ra3)
    assert rb3.replayed is False and rb3.value == 2
    assert doubles == [1, 1]


# -- r20: a :memory: store across threads ------------------------------------------------------------


def test_memory_store_is_shared_by_threads() -> None:
    engine = Engine(SQLiteStore(":memory:"))
    calls: list[int] = []

    @step
    def f(x: int) -> int:
        calls.append(x)
        return x

    try:
        with use_engine(engine):
            f(1)

        def worker() -> bool:
            with use_engine(engine):
                return f(1).replayed

        out = _in_thread(worker)
        assert out == {"value": True, "alive": False}
        assert calls == [1]
    finally:
        engine.close()
