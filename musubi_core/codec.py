"""Type-preserving artifact encoding. Never pickle.

The default codec writes the tagged JSON of :mod:`musubi_core._tagged`: a tuple
comes back a tuple, ``bytes`` as ``bytes``, a ``datetime`` as a ``datetime``, a
``set`` as a ``set``. Classes (pydantic models, dataclasses, enums, container
subclasses) are rebuilt only if they are on an explicit allow-list, so a
tampered store can make a value fail to decode but can never make musubi
construct an arbitrary object. ``@step`` allow-lists the classes named in the
function's return annotation automatically; anything else is added with
:func:`allow`.

>>> codec = JSONCodec()
>>> encoding, payload = codec.encode({"when": (1, b"x")})
>>> codec.decode(encoding, payload)
{'when': (1, b'x')}
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import datetime as dt
import decimal
import enum
import pathlib
import typing
import uuid
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel

from ._plain import COMPACT_JSON, NOT_PLAIN, load_json, plain_tree
from ._tagged import MAX_DEPTH, TagError, class_path, encode, with_fresh_stack
from .errors import DecodeError, SerializationError

__all__ = [
    "MAX_DEPTH",
    "Codec",
    "JSONCodec",
    "allow",
    "allow_annotation",
    "allowed_classes",
    "register_decoder",
]

JSON_ENCODING = "musubi-json/1"

_ALLOWED: dict[str, type] = {}
_DECODERS: dict[str, Callable[[Any], Any]] = {}
for _builtin in (collections.OrderedDict, collections.defaultdict, collections.Counter):
    _ALLOWED[class_path(_builtin)] = _builtin


@runtime_checkable
class Codec(Protocol):
    """Turns values into stored bytes and back. ``encoding`` names the format
    so several codecs can share one store."""

    def encode(self, value: Any) -> tuple[str, bytes]: ...

    def decode(self, encoding: str, payload: bytes) -> Any: ...


def allow(*classes: type) -> None:
    """Allow ``classes`` (pydantic models, dataclasses, enums, container
    subclasses) to be rebuilt from stored artifacts."""
    for cls in classes:
        if not isinstance(cls, type):
            raise TypeError(f"allow() takes classes, got {cls!r}")
        _ALLOWED[class_path(cls)] = cls


def allowed_classes() -> frozenset[type]:
    return frozenset(_ALLOWED.values())


def register_decoder(cls: type, decode: Callable[[Any], Any]) -> None:
    """Pair a :func:`register_encoder` encoder with its inverse for the codec."""
    _DECODERS[class_path(cls)] = decode


def allow_annotation(annotation: Any) -> None:
    """Allow-list every class named in a type annotation (``list[Model] | None``)."""
    seen: set[int] = set()

    def visit(tp: Any) -> None:
        if id(tp) in seen:
            return
        seen.add(id(tp))
        if isinstance(tp, type):
            if issubclass(tp, BaseModel | enum.Enum) or dataclasses.is_dataclass(tp):
                _ALLOWED.setdefault(class_path(tp), tp)
            return
        for arg in typing.get_args(tp):
            visit(arg)

    visit(annotation)


def _check_allowed(tree: Any) -> None:
    """Fail at encode time (not on some later replay) if a class in the value
    could not be rebuilt; the error names the path of the value."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(tree, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, list):
            stack.extend((item, (*path, f"[{i}]")) for i, item in enumerate(node))
        elif isinstance(node, dict):
            if not any(key.startswith("$") for key in node):
                # A plain dict: its keys are the user's keys.
                stack.extend((value, (*path, _key_label(key))) for key, value in node.items())
                continue
            for tag in ("$model", "$dataclass", "$enum", "$seq", "$mapping", "$scalar"):
                name = node.get(tag)
                if isinstance(name, str) and name not in _ALLOWED:
                    raise TagError(
                        f"class {name} is not allow-listed for decoding; call "
                        f"musubi_core.allow({name.split(':')[-1]}) or annotate the step's "
                        "return type with it",
                        tuple(reversed(path)),
                    )
            custom = node.get("$custom")
            if isinstance(custom, str) and custom not in _DECODERS:
                raise TagError(
                    f"no decoder registered for {custom}; call musubi_core.register_decoder",
                    tuple(reversed(path)),
                )
            # A tagged node wraps its content without adding a path segment.
            stack.extend((value, path) for value in node.values())


def _key_label(key: str) -> str:
    return f".{key}" if key.isidentifier() else f"[{key!r}]"


class JSONCodec:
    """The default codec: tagged JSON, UTF-8."""

    encoding = JSON_ENCODING

    def encode(self, value: Any) -> tuple[str, bytes]:
        try:
            # Plain JSON data is its own tagged tree (and names no class to allow): the C
            # encoder writes the same bytes as the tagged path below.
            plain = plain_tree(value)
            if plain is not NOT_PLAIN:
                return JSON_ENCODING, COMPACT_JSON(plain).encode("utf-8", "surrogatepass")
        except (RecursionError, ValueError):
            pass  # a cycle, deep nesting, a huge int: the tagged path says which
        return self._encode_tagged(value)

    def _encode_tagged(self, value: Any) -> tuple[str, bytes]:
        """:meth:`encode` through the type-tagged encoder (any value)."""
        try:
            payload = with_fresh_stack(_tagged_payload, value)
        except TagError as err:
            raise SerializationError(
                f"cannot store the result: {err}", path=err.path, value=value
            ) from None
        except RecursionError:
            raise SerializationError(
                "cannot store the result: nesting too deep; flatten it, or return it as a "
                "JSON string",
                value=value,
            ) from None
        except ValueError as exc:  # e.g. an int beyond sys.get_int_max_str_digits()
            raise SerializationError(f"cannot store the result: {exc}", value=value) from None
        return JSON_ENCODING, payload

    def decode(self, encoding: str, payload: bytes) -> Any:
        if encoding != JSON_ENCODING:
            raise DecodeError(f"unknown artifact encoding {encoding!r}")
        try:
            return with_fresh_stack(_decode_payload, payload)
        except DecodeError:
            raise
        except RecursionError:
            raise DecodeError(
                f"corrupt artifact: nesting too deep (musubi stores at most {MAX_DEPTH} levels)"
            ) from None
        except Exception as exc:
            # Whatever a tampered payload makes a constructor raise, it is a
            # miss (recompute), never a crash of the caller.
            raise DecodeError(f"corrupt artifact: {type(exc).__name__}: {exc}") from None


def _tagged_payload(value: Any) -> bytes:
    """The tagged JSON of ``value`` as UTF-8, after checking that every class it names can be
    rebuilt (``TagError`` if not, or if it nests deeper than ``MAX_DEPTH``)."""
    tree = encode(value, canonical=False)
    if isinstance(tree, dict | list):
        _check_allowed(tree)
    # surrogatepass: a str holding lone surrogates (os.fsdecode of undecodable bytes) is
    # stored as-is instead of failing.
    return COMPACT_JSON(tree).encode("utf-8", "surrogatepass")


def _decode_payload(payload: bytes) -> Any:
    tree = load_json(payload)
    if b'"$' not in payload and b"\\u0024" not in payload:
        # No string starts with "$": no tagged node anywhere, so the
        # parsed tree already is the value (_dec would copy it as is).
        return tree
    return _dec(tree)


def _allowed(name: str) -> type:
    cls = _ALLOWED.get(name)
    if cls is None:
        raise DecodeError(
            f"artifact names class {name}, which is not allow-listed; "
            "call musubi_core.allow(...) with it if you trust this store"
        )
    return cls


def _dec(node: Any) -> Any:
    if isinstance(node, list):
        return [_dec(item) for item in node]
    if not isinstance(node, dict):
        return node
    if not any(key.startswith("$") for key in node):
        return {key: _dec(value) for key, value in node.items()}
    return _dec_tag(node)


_SIMPLE: dict[str, Callable[[Any], Any]] = {
    "$float": float,
    "$bytes": lambda s: base64.b64decode(s, validate=True),
    "$bytearray": lambda s: bytearray(base64.b64decode(s, validate=True)),
    "$datetime": dt.datetime.fromisoformat,
    "$date": dt.date.fromisoformat,
    "$time": dt.time.fromisoformat,
    "$timedelta": lambda parts: dt.timedelta(
        days=parts[0], seconds=parts[1], microseconds=parts[2]
    ),
    "$decimal": decimal.Decimal,
    "$uuid": uuid.UUID,
    "$path": pathlib.Path,
}


def _dec_tag(node: dict[str, Any]) -> Any:
    for tag, fn in _SIMPLE.items():
        if tag in node:
            return fn(node[tag])
    if "$tuple" in node:
        return tuple(_dec(item) for item in node["$tuple"])
    if "$map" in node:
        return {_hashable(_dec(k)): _dec(v) for k, v in node["$map"]}
    if "$set" in node:
        return {_hashable(_dec(item)) for item in node["$set"]}
    if "$frozenset" in node:
        return frozenset(_hashable(_dec(item)) for item in node["$frozenset"])
    if "$enum" in node:
        return _allowed(node["$enum"])(_dec(node["value"]))
    if "$model" in node:
        model = _allowed(node["$model"])
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise DecodeError(f"{node['$model']} is not a pydantic model")
        return model.model_validate(_dec(node["fields"]))
    if "$dataclass" in node:
        return _dec_dataclass(_allowed(node["$dataclass"]), _dec(node["fields"]))
    if "$seq" in node:
        seq_cls = _allowed(node["$seq"])
        items = _dec(node["items"])
        if issubclass(seq_cls, tuple) and hasattr(seq_cls, "_make"):
            return seq_cls._make(items)  # a NamedTuple takes its fields positionally
        return seq_cls(items)
    if "$mapping" in node:
        cls = _allowed(node["$mapping"])
        items = _dec(node["items"])
        if cls is collections.defaultdict:
            return collections.defaultdict(None, items)
        return cls(items)
    if "$scalar" in node:
        return _allowed(node["$scalar"])(_dec(node["value"]))
    if "$custom" in node:
        decoder = _DECODERS.get(node["$custom"])
        if decoder is None:
            raise DecodeError(f"no decoder registered for {node['$custom']}")
        return decoder(_dec(node["value"]))
    raise DecodeError(f"unknown tag in artifact: {sorted(node)[:3]}")


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        raise DecodeError("corrupt artifact: a list cannot be a dict key or set member")
    return value


def _dec_dataclass(cls: type, fields: dict[str, Any]) -> Any:
    if not dataclasses.is_dataclass(cls):
        raise DecodeError(f"{class_path(cls)} is not a dataclass")
    all_fields = dataclasses.fields(cls)
    init_fields = {f.name for f in all_fields if f.init}
    other_fields = {f.name for f in all_fields if not f.init}
    unknown = set(fields) - init_fields - other_fields
    if unknown:
        # Only declared fields may be set: a tampered artifact must not be
        # able to plant arbitrary attributes (``__dict__``, ...).
        raise DecodeError(f"{class_path(cls)} has no field(s) {sorted(unknown)[:3]}")
    # __init__ runs (and with it __post_init__ validation), then every stored
    # field is put back as stored: a __post_init__ that transforms a field
    # (x * 2) must not be applied a second time on replay.
    obj = cls(**{k: v for k, v in fields.items() if k in init_fields})
    for name, value in fields.items():
        object.__setattr__(obj, name, value)
    return obj
