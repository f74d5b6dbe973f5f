"""Deep values (issue 10, "Deep values"): what the codec writes, it can read back.

Containers may nest ``MAX_DEPTH`` deep in a stored value, whatever their kind and whichever
encoder writes them (the plain C fast path or the tagged encoder). One level more raises
``SerializationError`` carrying the value before anything is written, so a step never stores
an output it cannot replay. Decoding a value at the limit works however deep the caller's own
stack is, and hashing a too-deep input names the path instead of raising ``RecursionError``.
"""

from __future__ import annotations

import collections
import dataclasses
import sqlite3
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from musubi_core import (
    Engine,
    IdentityError,
    Result,
    SerializationError,
    allow,
    merge,
    register_encoder,
    step,
)
from musubi_core._plain import NOT_PLAIN, plain_tree
from musubi_core._tagged import MAX_DEPTH
from musubi_core.codec import JSONCodec
from musubi_core.identity import INPUT_MAX_DEPTH, _tagged_bytes, canonical_bytes, input_hash


@dataclasses.dataclass
class Box:
    inner: Any


allow(Box)

KINDS: dict[str, Callable[[Any], Any]] = {
    "list": lambda v: [v],
    "dict": lambda v: {"k": v},
    "tuple": lambda v: (v,),
    "int-keyed dict": lambda v: {1: v},
    "frozenset": lambda v: frozenset([v]),
    "OrderedDict": lambda v: collections.OrderedDict([(1, v)]),
    "dataclass": Box,
}


def nest(kind: str, depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = KINDS[kind](value)
    return value


def at_stack_depth(frames: int, fn: Callable[[], Any]) -> Any:
    """``fn()`` called ``frames`` Python frames deeper than here."""
    if frames <= 0:
        return fn()
    return at_stack_depth(frames - 1, fn)


def stack_depth() -> int:
    frame, depth = sys._getframe(), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1  # type: ignore[assignment]
    return depth


def _rows(path: Path, table: str) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    finally:
        db.close()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_max_depth_round_trips_and_one_more_is_refused(kind: str) -> None:
    codec = JSONCodec()
    deepest = nest(kind, MAX_DEPTH)
    assert codec.decode(*codec.encode(deepest)) == deepest
    too_deep = nest(kind, MAX_DEPTH + 1)
    with pytest.raises(SerializationError, match="nesting too deep") as raised:
        codec.encode(too_deep)
    err = raised.value
    assert err.value is too_deep  # the computed value is never lost
    assert err.path.startswith("$") and len(err.path) > 100  # where, not just "$"
    assert "flatten" in str(err)


def test_the_plain_fast_path_has_the_same_limit() -> None:
    codec = JSONCodec()
    for kind in ("list", "dict"):
        deepest, too_deep = nest(kind, MAX_DEPTH), nest(kind, MAX_DEPTH + 1)
        assert plain_tree(deepest) is deepest
        assert plain_tree(too_deep) is NOT_PLAIN  # left to the tagged encoder, which refuses
        with pytest.raises(SerializationError):
            codec.encode(too_deep)
    # Below the limit the fast path writes the tagged encoder's bytes, as everywhere else.
    deepest = nest("dict", MAX_DEPTH)
    assert codec.encode(deepest) == codec._encode_tagged(deepest)
    assert canonical_bytes(deepest) == _tagged_bytes(deepest, None)
    # Deeper values stored by an earlier version still decode: reading stays lenient.
    old: list[Any] = []
    for _ in range(MAX_DEPTH + 49):
        old = [old]
    written = b"[" * (MAX_DEPTH + 50) + b"]" * (MAX_DEPTH + 50)
    assert codec.decode("musubi-json/1", written) == old


def test_a_step_returning_a_too_deep_value_raises_and_writes_nothing(
    engine: Engine, db_path: Path
) -> None:
    runs: list[int] = []

    @step
    def build(depth: int) -> Any:
        runs.append(depth)
        return nest("tuple", depth)

    for depth in (400, MAX_DEPTH + 1):  # the issue's ~400, and the boundary
        for _ in range(2):
            with warnings.catch_warnings():
                # No "could not be decoded; recomputing" on the second call: nothing was
                # stored to fail to decode. The step is loudly refused every time.
                warnings.simplefilter("error")
                with pytest.raises(SerializationError) as raised:
                    build(depth)
            assert raised.value.value == nest("tuple", depth)
    engine.flush()
    assert runs == [400, 400, MAX_DEPTH + 1, MAX_DEPTH + 1]
    assert _rows(db_path, "musubi_nodes") == 0 and _rows(db_path, "musubi_artifacts") == 0

    first = build(MAX_DEPTH)
    again = build(MAX_DEPTH)
    assert first.replayed is False and again.replayed is True
    assert again.value == nest("tuple", MAX_DEPTH)


@pytest.mark.parametrize("kind", ["tuple", "OrderedDict", "dataclass"])
def test_a_value_at_the_limit_replays_from_a_deep_caller_stack(engine: Engine, kind: str) -> None:
    runs: list[str] = []

    @step
    def build(k: str) -> Any:
        runs.append(k)
        return nest(k, MAX_DEPTH)

    build(kind)
    # A caller that has used most of its stack (a deep recursion, a deep framework stack):
    # the stored value still decodes, so the step replays instead of re-running every time.
    room = sys.getrecursionlimit() - stack_depth() - 120
    replayed: Result[Any] = at_stack_depth(room, lambda: build(kind))
    assert replayed.replayed is True and runs == [kind]
    assert replayed.value == nest(kind, MAX_DEPTH)
    codec = JSONCodec()
    payload = codec.encode(nest(kind, MAX_DEPTH))
    assert at_stack_depth(room, lambda: codec.decode(*payload)) == nest(kind, MAX_DEPTH)
    assert at_stack_depth(room, lambda: codec.encode(nest(kind, MAX_DEPTH))) == payload


def test_hashing_a_too_deep_input_names_the_path(engine: Engine) -> None:
    @step
    def consume(doc: Any) -> int:
        return 1

    # A stored value at the limit can be passed on as an argument, even inside merge().
    parent = consume(nest("tuple", MAX_DEPTH))
    with merge(parent):
        assert consume(nest("tuple", MAX_DEPTH)).value == 1
    assert INPUT_MAX_DEPTH >= MAX_DEPTH + 2
    for kind in ("list", "tuple"):
        with pytest.raises(TypeError, match="nesting too deep") as raised:
            consume(nest(kind, INPUT_MAX_DEPTH))
        err = raised.value
        assert isinstance(err, IdentityError)
        assert err.path.startswith("$.doc[0][0]" if kind == "list" else "$.doc[0]")
    with pytest.raises(IdentityError, match="nesting too deep") as deep:
        canonical_bytes(nest("list", 5000))  # far past any limit: still no RecursionError
    assert deep.value.path.startswith("$[0][0]")


def test_custom_encoders_that_recurse_are_a_cycle_not_a_recursion_error() -> None:
    class Loop:
        pass

    register_encoder(Loop, lambda obj: [obj])
    with pytest.raises(SerializationError, match="cycle"):
        JSONCodec().encode(Loop())
    with pytest.raises(IdentityError, match="cycle"):
        input_hash(Loop())
