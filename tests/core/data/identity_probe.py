"""Prints the identities of a fixed set of values as JSON.

Run by tests/core/test_identity.py under several interpreters and
PYTHONHASHSEED values. It imports only musubi_core.identity (and what it
needs), never the package __init__, and stubs pydantic when the interpreter
has none, so it runs on any Python >= 3.10 with the standard library alone.
Usage: python identity_probe.py /path/to/musubi_core
"""

import dataclasses
import datetime as dt
import decimal
import enum
import json
import sys
import types
import uuid

try:
    import pydantic  # noqa
except ImportError:
    stub = types.ModuleType("pydantic")

    class BaseModel:  # never instantiated: only isinstance checks
        pass

    stub.BaseModel = BaseModel
    sys.modules["pydantic"] = stub
pkg = types.ModuleType("musubi_core")
pkg.__path__ = [sys.argv[1]]
sys.modules["musubi_core"] = pkg
from musubi_core.identity import (  # noqa: E402
    function_fingerprint,
    input_hash,
    make_node_id,
    make_op,
    receiver_identity,
)


class Color(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: int
    y: float


class Declared:
    def __musubi_identity__(self):
        return ("model", 0.5, {"k": [1, None]})


async def agen():
    yield 1


def sample_step(prompt: str, *, n: int = 2) -> list:
    """Docstring."""
    out = [f"{prompt}-{i}" for i in range(n) if i % 2 == 0]

    async def inner() -> dict:
        return {**{"a": 1}, "b": [x async for x in agen()]}

    if prompt == "x":
        pass  # a comment
    return sorted(set(out), key=lambda s: (len(s), s))


values = [
    1,
    1.0,
    True,
    "1",
    None,
    [1, 2],
    (1, 2),
    {"b": 1, "a": [1.5, -0.0]},
    {1: "int key", "s": 2, (1, 2): 3},
    {"z", "y", "x", "ß"},
    frozenset({3, 1, 2}),
    b"\x00\xff",
    bytearray(b"ab"),
    dt.datetime(2024, 1, 2, 3, 4, 5, 6),
    dt.date(2024, 1, 2),
    dt.timedelta(days=1, seconds=2),
    decimal.Decimal("1.10"),
    uuid.UUID(int=7),
    Color.RED,
    Point(1, 2.5),
    10**30,
    -3,
    1e-300,
    "ünïcødé \u2028",
    {"messages": [{"role": "user", "content": "hi"}]},
]
out = {
    "hashes": [input_hash(v) for v in values],
    "node": make_node_id(make_op("op", {"code": "x"}), input_hash(values), ["b" * 64, "a" * 64]),
    "fingerprint": function_fingerprint(sample_step),
    # A method's receiver, as @step puts it next to the arguments.
    "receivers": [
        input_hash({"self": receiver_identity(r, "C.m"), "x": 1})
        for r in (Point(1, 2.5), Color.RED, Declared(), Point)
    ],
}
print(json.dumps(out))
