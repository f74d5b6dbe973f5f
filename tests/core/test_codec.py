"""The artifact codec: type-preserving round trips, SerializationError that
keeps the value and commits nothing, and tampered artifacts that decode to a
miss with a warning without ever constructing a class."""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import decimal
import enum
import json
import pathlib
import sqlite3
import uuid
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from musubi_core import (
    DecodeError,
    Engine,
    JSONCodec,
    ReplayReason,
    SerializationError,
    _tagged,
    allow,
    register_decoder,
    register_encoder,
    step,
)
from musubi_core import codec as codec_module
from musubi_core._plain import load_json
from tests.support.tamper import readdress

CONSTRUCTED: list[str] = []


class Evil:
    """Never allow-listed: a tampered store naming it must not build it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        CONSTRUCTED.append("Evil")


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: float
    tags: tuple[str, ...] = ()


class Report(BaseModel):
    title: str
    when: dt.datetime
    points: list[Point] = []


class Answer(BaseModel):
    """Only named in a step's return annotation: @step allow-lists it."""

    text: str
    sources: tuple[str, ...]


class Mood(enum.Enum):
    HAPPY = "happy"


class Pair(NamedTuple):
    left: int
    right: str


def roundtrip(value: Any) -> Any:
    codec = JSONCodec()
    return codec.decode(*codec.encode(value))


@pytest.mark.parametrize(
    "value",
    [
        (1, (2, 3), [4, (5,)]),
        b"\x00\x01\xff",
        bytearray(b"xy"),
        dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone(dt.timedelta(hours=9))),
        dt.date(2024, 5, 6),
        dt.time(7, 8, 9),
        dt.timedelta(days=-1, seconds=5, microseconds=7),
        decimal.Decimal("3.140"),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        pathlib.Path("a/b.txt"),
        {1, 2, 3},
        frozenset({"a", "b"}),
        {1: "int", (1, 2): "tuple", "s": None, 2.5: True},
        {"$tuple": "a user key that looks like a tag"},
        collections.OrderedDict([("b", 1), ("a", 2)]),
        collections.Counter("hello"),
        -0.0,
        10**40,
        "unicode \u2028 ✓",
    ],
    ids=lambda v: type(v).__name__,
)
def test_round_trip_preserves_type_and_value(value: Any) -> None:
    back = roundtrip(value)
    assert type(back) is type(value)
    assert back == value
    if isinstance(value, float):
        assert repr(back) == repr(value)
    if isinstance(value, dict):
        assert list(back) == list(value)


def test_allow_listed_classes_round_trip() -> None:
    allow(Report, Point, Mood, Pair)
    report = Report(title="t", when=dt.datetime(2024, 1, 1), points=[Point(1, 2.0, ("a",))])
    for value in (report, Point(1, 2.5), Mood.HAPPY, Pair(1, "x"), [Mood.HAPPY, (Point(0, 0.0),)]):
        back = roundtrip(value)
        assert back == value and type(back) is type(value)
    assert isinstance(roundtrip(report).points[0], Point)


def test_step_allow_lists_its_return_annotation(engine: Engine) -> None:
    calls: Counter[str] = Counter()

    @step()
    def answer(q: str) -> Answer | None:
        calls["answer"] += 1
        return Answer(text=q.upper(), sources=("a", "b"))

    first = answer("q")
    second = answer("q")
    assert calls["answer"] == 1 and second.replayed
    assert type(second.value) is Answer and second.value == first.value
    assert second.value is not first.value
    assert second.value.sources == ("a", "b")


def test_serialization_error_keeps_the_value_and_commits_nothing(
    engine: Engine, db_path: Path
) -> None:
    calls: Counter[str] = Counter()
    computed: dict[str, Any] = {}

    class Opaque:
        pass

    @step()
    def expensive(prompt: str) -> Any:
        calls["expensive"] += 1
        computed["value"] = {"answer": "42", "extra": [1, Opaque()]}
        return computed["value"]

    with pytest.raises(SerializationError) as raised:
        expensive("q")
    err = raised.value
    assert err.value is computed["value"]  # the expensive result is not lost
    assert err.path == "$.extra[1]"
    assert "$.extra[1]" in str(err) and "Opaque" in str(err)
    engine.flush()
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("SELECT COUNT(*) FROM musubi_nodes").fetchone()[0] == 0
        assert raw.execute("SELECT COUNT(*) FROM musubi_artifacts").fetchone()[0] == 0
        assert raw.execute("SELECT COUNT(*) FROM musubi_edges").fetchone()[0] == 0
    with pytest.raises(SerializationError):
        expensive("q")
    assert calls["expensive"] == 2


def test_serialization_error_for_classes_not_allow_listed(engine: Engine) -> None:
    @dataclasses.dataclass
    class Unlisted:
        x: int

    @step()
    def make(x: int) -> Any:
        return {"items": [Unlisted(x)]}

    with pytest.raises(SerializationError, match=r"not allow-listed.*allow\(") as raised:
        make(1)
    assert raised.value.path == "$.items[0]"
    allow(Unlisted)
    assert make(1).value == {"items": [Unlisted(1)]}
    assert type(make(1).value["items"][0]) is Unlisted


def test_nan_in_a_result_is_a_serialization_error(engine: Engine) -> None:
    @step()
    def scores() -> dict[str, float]:
        return {"ok": 1.0, "bad": float("nan")}

    with pytest.raises(SerializationError) as raised:
        scores()
    assert raised.value.path == "$.bad"


def test_registered_encoder_and_decoder_round_trip() -> None:
    class Money:
        def __init__(self, cents: int) -> None:
            self.cents = cents

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Money) and other.cents == self.cents

        __hash__ = None  # type: ignore[assignment]

    register_encoder(Money, lambda m: m.cents)
    try:
        with pytest.raises(SerializationError, match="register_decoder"):
            JSONCodec().encode(Money(5))
        register_decoder(Money, Money)
        back = roundtrip({"price": Money(5)})
        assert back == {"price": Money(5)} and type(back["price"]) is Money
    finally:
        _tagged._CUSTOM.pop(Money, None)
        codec_module._DECODERS.pop(_tagged.class_path(Money), None)


@pytest.mark.parametrize(
    "payload",
    [
        {"$dataclass": f"{__name__}:Evil", "fields": {}},
        {"$model": f"{__name__}:Evil", "fields": {}},
        {"$seq": "builtins:eval", "items": ["__import__('os')"]},
        {"$scalar": "os:system", "value": "true"},
        {"$mapping": "subprocess:Popen", "items": {"args": "true"}},
        {"$custom": "os:system", "value": "true"},
        {"$no-such-tag": 1},
    ],
    ids=["dataclass", "model", "seq-eval", "scalar-system", "mapping-popen", "custom", "unknown"],
)
def test_decoding_never_constructs_unlisted_classes(payload: Any) -> None:
    with pytest.raises(DecodeError):
        JSONCodec().decode("musubi-json/1", json.dumps(payload).encode())
    assert CONSTRUCTED == []


def test_corrupt_payloads_raise_decode_error() -> None:
    codec = JSONCodec()
    for bad in (b"{not json", b'{"$bytes": "***"}', b'{"$set": [[1]]}', b'{"$tuple": 5}'):
        with pytest.raises(DecodeError):
            codec.decode("musubi-json/1", bad)
    with pytest.raises(DecodeError, match="unknown artifact encoding"):
        codec.decode("pickle", b"x")


def _tamper(db_path: Path, artifact_id: str, *, payload: bytes | None = None,
            encoding: str | None = None) -> None:
    # Stored under its own content id (an edit made to pass the content-id check that every
    # replay makes): only the decoder stands between the edited artifact and the caller.
    readdress(db_path, artifact_id, payload=payload, encoding=encoding)


@pytest.mark.parametrize(
    "tamper",
    [
        {"payload": json.dumps({"$dataclass": f"{__name__}:Evil", "fields": {}}).encode()},
        {"payload": b"\x80garbage"},
        {"encoding": "pickle/4"},
    ],
    ids=["names-evil-class", "garbage", "unknown-encoding"],
)
def test_tampered_artifact_is_a_miss_with_a_warning(
    engine: Engine, db_path: Path, tamper: dict[str, Any]
) -> None:
    calls: Counter[str] = Counter()

    @step()
    def locate(name: str) -> Point:
        calls["locate"] += 1
        return Point(len(name), 0.5, ("t",))

    first = locate("tokyo")
    _tamper(db_path, first.artifact_id, **tamper)
    with pytest.warns(RuntimeWarning, match="could not be decoded.*recomputing"):
        decision = engine.lookup(locate.key("tokyo")[0])
    assert not decision.replay and decision.decision.reason is ReplayReason.ARTIFACT_CORRUPT
    with pytest.warns(RuntimeWarning, match="could not be decoded"):
        second = locate("tokyo")
    assert not second.replayed and second.value == Point(5, 0.5, ("t",))
    assert calls["locate"] == 2
    assert CONSTRUCTED == []
    # The recomputation rewrote the artifact: the store has healed.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third = locate("tokyo")
    assert third.replayed and third.value == Point(5, 0.5, ("t",))
    assert calls["locate"] == 2


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False) | st.text(alphabet=st.characters(blacklist_categories=())),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_JSON_VALUES)
def test_a_payload_parses_to_what_json_parses_it_to(value: Any) -> None:
    """load_json (orjson where it parses exactly) gives json.loads' value: integers past 64
    bits stay integers, lone surrogates stay, floats keep their bits."""
    payload = json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    expected = json.loads(payload.decode("utf-8", "surrogatepass"))
    got = load_json(payload)
    assert got == expected
    assert repr(got) == repr(expected)  # 1 and 1.0, -0.0 and 0.0 told apart


@pytest.mark.parametrize(
    "payload",
    [b"NaN", b"[Infinity]", b"1e400", b'"\\ud800"', b"[12345678901234567890123]",
     b"-9223372036854775809", b'{"a":1,"a":2}'],
)
def test_what_orjson_refuses_or_would_change_is_parsed_by_json(payload: bytes) -> None:
    got, expected = load_json(payload), json.loads(payload)
    assert repr(got) == repr(expected)
