"""Identity: the canonical encoding is injective over typed values, independent
of dict order, PYTHONHASHSEED and Python version; errors name the path."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import json
import math
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from musubi_core import Result, _tagged, input_hash, register_encoder
from musubi_core.codec import JSONCodec
from musubi_core.identity import (
    AliasPrefix,
    IdentityError,
    alias_of,
    canonical_bytes,
    make_node_id,
)

PROBE = Path(__file__).parent / "data" / "identity_probe.py"
CORE = Path(__file__).resolve().parents[2] / "musubi_core"
PYENV = Path("/root/.pyenv/versions")

# -- a typed model of values, independent of the implementation ------------------------


def typed_key(v: Any) -> Any:
    """Two values have the same typed_key iff they are the same type and value
    all the way down (1 != 1.0 != True, list != tuple, -0.0 != 0.0)."""
    t = type(v)
    if v is None or t in (bool, int, str, bytes, bytearray):
        return (t.__name__, bytes(v) if t is bytearray else v)
    if t is float:
        return ("float", repr(v))
    if t in (list, tuple):
        return (t.__name__, tuple(typed_key(x) for x in v))
    if t in (set, frozenset):
        return (t.__name__, frozenset(typed_key(x) for x in v))
    if t is dict:
        return ("dict", frozenset((typed_key(k), typed_key(x)) for k, x in v.items()))
    if t in (dt.datetime, dt.date):
        return (t.__name__, v.isoformat())
    if t is decimal.Decimal:
        return ("Decimal", str(v))
    if t is uuid.UUID:
        return ("UUID", str(v))
    raise AssertionError(f"unexpected {t}")


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.sampled_from(["$float", "$tuple", "$map", "$bytes", "1", "1.0", "True", "None"]),
    st.binary(max_size=8),
    st.binary(max_size=4).map(bytearray),
    st.datetimes(min_value=dt.datetime(1900, 1, 1)),
    st.dates(),
    st.decimals(allow_nan=False, allow_infinity=False, places=3),
    st.uuids(),
)
hashables = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=4),
    st.floats(allow_nan=False, allow_infinity=False), st.binary(max_size=3),
)
keys = st.one_of(st.text(max_size=6), st.sampled_from(["$tuple", "$float", "$map", "a", "b"]))

values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(keys, inner, max_size=4),
        st.dictionaries(hashables, inner, max_size=3),
        st.frozensets(hashables, max_size=4),
        st.sets(hashables, max_size=4),
    ),
    max_leaves=12,
)

SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@SETTINGS
@given(values, values)
def test_canonical_bytes_is_injective(a: Any, b: Any) -> None:
    same_bytes = canonical_bytes(a) == canonical_bytes(b)
    assert same_bytes == (typed_key(a) == typed_key(b)), (a, b)


confusables = st.recursive(
    st.sampled_from([0, 1, 0.0, 1.0, -0.0, True, False, "1", "", "0", None, b"", b"1"]),
    lambda inner: st.one_of(
        st.lists(inner, max_size=2),
        st.lists(inner, max_size=2).map(tuple),
        st.dictionaries(st.sampled_from(["a", "$tuple"]), inner, max_size=2),
        st.dictionaries(st.sampled_from([1, "1", 1.5]), inner, max_size=2),
        st.frozensets(st.sampled_from([0, 1, "1", 2.5]), max_size=2),
    ),
    max_leaves=4,
)


@SETTINGS
@given(confusables, confusables)
def test_canonical_bytes_is_injective_over_confusable_values(a: Any, b: Any) -> None:
    """A tiny domain, so that equal and almost-equal pairs come up often."""
    same_bytes = canonical_bytes(a) == canonical_bytes(b)
    assert same_bytes == (typed_key(a) == typed_key(b)), (a, b)


@SETTINGS
@given(values)
def test_canonical_bytes_is_deterministic_and_valid_json(v: Any) -> None:
    data = canonical_bytes(v)
    assert data == canonical_bytes(v)
    json.loads(data)
    assert input_hash(v) == input_hash(v)
    assert len(input_hash(v)) == 64


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(keys, values, max_size=6), st.randoms(use_true_random=False))
def test_dict_order_is_irrelevant(d: dict[str, Any], rnd: Any) -> None:
    items = list(d.items())
    rnd.shuffle(items)
    shuffled = dict(items)
    assert canonical_bytes(shuffled) == canonical_bytes(d)
    assert canonical_bytes({"outer": shuffled, "x": [shuffled]}) == canonical_bytes(
        {"x": [d], "outer": d}
    )


@SETTINGS
@given(values)
def test_codec_round_trip_preserves_type_and_value(v: Any) -> None:
    codec = JSONCodec()
    encoding, payload = codec.encode(v)
    back = codec.decode(encoding, payload)
    assert typed_key(back) == typed_key(v)
    if type(v) is dict:
        assert list(back) == list(v)  # the codec keeps insertion order


# -- specific distinctions ----------------------------------------------------------------


def test_one_one_point_oh_true_and_string_one_are_distinct() -> None:
    hashes = {input_hash(v) for v in (1, 1.0, True, "1")}
    assert len(hashes) == 4
    assert input_hash(0) != input_hash(False) != input_hash(0.0)
    assert input_hash(None) != input_hash("None")


def test_containers_are_distinct() -> None:
    forms: list[Any] = [[1, 2], (1, 2), {1, 2}, frozenset({1, 2}), {"$tuple": [1, 2]}]
    assert len({input_hash(v) for v in forms}) == len(forms)
    assert input_hash(b"ab") != input_hash(bytearray(b"ab")) != input_hash("ab")
    assert input_hash([]) != input_hash(()) != input_hash({})

    class Pair(NamedTuple):
        a: int
        b: int

    assert input_hash(Pair(1, 2)) != input_hash((1, 2))


def test_tagged_types_hash_by_type_and_value() -> None:
    class Color(enum.Enum):
        RED = "red"

    @dataclasses.dataclass
    class Msg:
        role: str
        content: str

    class Model(BaseModel):
        role: str
        content: str

    base = {"role": "user", "content": "hi"}
    forms = [base, Msg(**base), Model(**base), Color.RED, "red",
             dt.datetime(2024, 1, 1), dt.date(2024, 1, 1), "2024-01-01",
             decimal.Decimal("1.0"), decimal.Decimal("1.00"), uuid.UUID(int=1)]
    assert len({input_hash(v) for v in forms}) == len(forms)
    assert input_hash(Model(**base)) == input_hash(Model(content="hi", role="user"))
    assert input_hash(Msg("user", "hi")) != input_hash(Msg("user", "hi!"))


def test_result_arguments_hash_by_artifact_not_node() -> None:
    a = Result(value="x", node_id="n1", producer_node_id="n1", artifact_id="art", replayed=False)
    b = Result(value="y", node_id="n2", producer_node_id="n2", artifact_id="art", replayed=True)
    c = Result(value="x", node_id="n1", producer_node_id="n1", artifact_id="other", replayed=False)
    assert input_hash({"doc": a}) == input_hash({"doc": b})
    assert input_hash({"doc": a}) != input_hash({"doc": c})
    # ... while the upstream node ids enter the node id, order-insensitively.
    assert make_node_id("op", "h", ["n1", "n2"]) == make_node_id("op", "h", ["n2", "n1", "n1"])
    assert make_node_id("op", "h", ["n1"]) != make_node_id("op", "h", ["n2"])
    assert make_node_id("op", "h", []) != make_node_id("op2", "h", [])


# -- errors ------------------------------------------------------------------------------


def test_unsupported_type_names_the_path() -> None:
    class Opaque:
        pass

    messages: list[dict[str, Any]] = [{"role": "user", "content": "x"} for _ in range(3)]
    messages.append({"role": "user", "content": Opaque()})
    with pytest.raises(TypeError) as raised:
        input_hash({"model": "m", "messages": messages})
    err = raised.value
    assert isinstance(err, IdentityError)
    assert err.path == "$.messages[3].content"
    assert "$.messages[3].content" in str(err)
    assert "register_encoder" in str(err) and "Opaque" in str(err)

    with pytest.raises(TypeError) as raised:
        input_hash({"odd key": [(1, {"k": Opaque()})]})
    assert raised.value.path == "$['odd key'][0][1].k"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "bad",
    [math.nan, math.inf, -math.inf, decimal.Decimal("NaN"), decimal.Decimal("Infinity")],
    ids=["nan", "inf", "-inf", "Decimal-NaN", "Decimal-inf"],
)
def test_nan_and_infinities_are_rejected(bad: Any) -> None:
    with pytest.raises(TypeError) as raised:
        input_hash({"params": {"temperature": bad}})
    assert raised.value.path == "$.params.temperature"  # type: ignore[attr-defined]
    assert "stable identity" in str(raised.value)


def test_cycles_are_detected_and_shared_references_are_not_cycles() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(TypeError, match="cycle"):
        input_hash(loop)
    d: dict[str, Any] = {}
    d["self"] = {"again": d}
    with pytest.raises(TypeError, match=r"cycle.*\$\.self\.again"):
        input_hash(d)
    shared = [1, 2]
    assert input_hash([shared, shared]) == input_hash([[1, 2], [1, 2]])
    deep: Any = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(TypeError, match="too deep"):
        input_hash(deep)


def test_register_encoder() -> None:
    class Money:
        def __init__(self, cents: int, currency: str) -> None:
            self.cents, self.currency = cents, currency

    class Points:
        def __init__(self, cents: int, currency: str) -> None:
            self.cents, self.currency = cents, currency

    with pytest.raises(TypeError, match=r"register_encoder\(.*Money, fn\).*at \$\.price"):
        input_hash({"price": Money(100, "EUR")})
    register_encoder(Money, lambda m: {"cents": m.cents, "currency": m.currency})
    register_encoder(Points, lambda m: {"cents": m.cents, "currency": m.currency})
    try:
        assert input_hash(Money(100, "EUR")) == input_hash(Money(100, "EUR"))
        assert input_hash(Money(100, "EUR")) != input_hash(Money(101, "EUR"))
        # Same representation, different type: different identity.
        assert input_hash(Money(100, "EUR")) != input_hash(Points(100, "EUR"))
        assert input_hash(Money(100, "EUR")) != input_hash({"cents": 100, "currency": "EUR"})
        with pytest.raises(TypeError):
            register_encoder("not a class", str)  # type: ignore[arg-type]
    finally:
        _tagged._CUSTOM.pop(Money, None)
        _tagged._CUSTOM.pop(Points, None)


# -- across processes and interpreters ---------------------------------------------------


def _probe(run: Callable[..., Any], python: str, seed: str) -> dict[str, Any]:
    env = {"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"}
    proc = run(PROBE.read_text(), str(CORE), python=python, env=env)
    data: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return data


def test_identity_is_independent_of_pythonhashseed(run_py: Any) -> None:
    results = [_probe(run_py, sys.executable, seed) for seed in ("0", "1", "4294967295", "random")]
    assert all(r == results[0] for r in results[1:])
    # ... and the probe (which loads identity.py alone) agrees with this process.
    assert results[0]["hashes"][:4] == [input_hash(v) for v in (1, 1.0, True, "1")]
    assert results[0]["hashes"][9] == input_hash({"z", "y", "x", "ß"})


OTHER_PYTHONS = [
    str(PYENV / version / "bin" / "python")
    for version in ("3.10.13", "3.12.1", "3.13.0")
    if (PYENV / version / "bin" / "python").exists()
]


@pytest.mark.skipif(not OTHER_PYTHONS, reason="no other Python versions installed")
def test_identity_is_equal_across_python_versions(run_py: Any) -> None:
    """identity.py runs under each interpreter (pydantic stubbed when missing:
    the probe's values use no pydantic model) and gives the same hashes, node
    id and code fingerprint as this interpreter."""
    here = _probe(run_py, sys.executable, "0")
    for python in OTHER_PYTHONS:
        there = _probe(run_py, python, "random")
        assert there == here, python
    print(f"\nidentity equal on {sys.version.split()[0]} and {len(OTHER_PYTHONS)} others")


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=8),
        st.sampled_from(["$float", "\u2028", "lone\udc80", "é東京"]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)
    ),
    max_leaves=16,
)


@SETTINGS
@given(json_values)
def test_plain_fast_path_writes_the_tagged_encoders_bytes(value: Any) -> None:
    """canonical_bytes and JSONCodec.encode write JSON-shaped data with the C encoder
    (musubi_core._plain); the bytes must be exactly those of the type-tagged path they skip,
    or every stored identity and artifact would change."""
    from musubi_core.codec import JSONCodec
    from musubi_core.identity import _tagged_bytes

    codec = JSONCodec()
    assert canonical_bytes(value) == _tagged_bytes(value, None)
    assert codec.encode(value) == codec._encode_tagged(value)
    assert codec.decode(*codec.encode(value)) == value


def test_plain_fast_path_leaves_errors_to_the_tagged_encoder() -> None:
    from musubi_core.codec import JSONCodec
    from musubi_core.errors import SerializationError

    cyclic: list[Any] = [1]
    cyclic.append(cyclic)
    with pytest.raises(TypeError, match=r"cycle|nesting") as hashed:
        canonical_bytes(cyclic)
    with pytest.raises(SerializationError):
        JSONCodec().encode(cyclic)
    huge = 10**5000  # beyond sys.get_int_max_str_digits(): the plain text cannot be written
    with pytest.raises(TypeError, match="cannot hash input"):
        canonical_bytes({"n": huge})
    assert hashed.value is not None


_PARTS = st.text(alphabet=st.characters(blacklist_categories=()), max_size=40)


@settings(max_examples=200, deadline=None)
@given(st.lists(_PARTS, min_size=1, max_size=4), _PARTS, _PARTS)
def test_an_alias_is_the_digest_stored_aliases_were_made_with(
    parts: list[str], scheme: str, namespace: str
) -> None:
    """Aliases are stored: the digest of the length-prefixed parts, hashed whole or from a
    kept prefix state, is the one every earlier version stored (lone surrogates included)."""
    import hashlib

    text = "".join(f"{len(p)}:{p}" for p in (scheme, namespace, *parts))
    stored = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    assert alias_of(scheme, namespace, *parts) == stored
    assert AliasPrefix(scheme, namespace, *parts[:-1]).alias(parts[-1]) == stored
    prefix = AliasPrefix(scheme, namespace, *parts[:-1])
    assert prefix.alias(parts[-1]) == prefix.alias(parts[-1])  # the kept state is not consumed
