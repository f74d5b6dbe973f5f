"""The type-tagged JSON vocabulary shared by identity hashing and the artifact codec.

A Python value is turned into a JSON-compatible tree in which every type that
JSON would blur keeps an explicit tag: ``1``, ``1.0``, ``True`` and ``"1"`` stay
distinct, a tuple is not a list, ``bytes`` and ``datetime`` say what they are.

Two modes share one walker so that the two uses can never drift apart:

* ``canonical=True`` (identity): dict keys and set members are sorted, so equal
  values give byte-identical output in every process, whatever
  ``PYTHONHASHSEED`` or insertion order was.
* ``canonical=False`` (codec): dict order is kept, so a decoded value looks
  exactly like the one that was stored.

Errors name the failing spot as a JSON-path (``$.messages[3].content``).

Containers (lists, tuples, dicts, sets, dataclasses, models, custom-encoded objects) may nest
at most :data:`MAX_DEPTH` deep. The limit is explicit so that what is written can always be
read back: the decoder (and the C JSON parser under it) needs a few stack frames per level,
and a value accepted here must never be one that only decodes on a shallower stack.
"""

from __future__ import annotations

import base64
import contextvars
import dataclasses
import datetime as dt
import decimal
import enum
import json
import math
import pathlib
import threading
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel

__all__ = [
    "MAX_DEPTH",
    "TagError",
    "class_path",
    "encode",
    "register_encoder",
    "registered_encoders",
    "with_fresh_stack",
]

A = TypeVar("A")
T = TypeVar("T")

MAX_DEPTH = 100
"""How many containers may nest inside one another in a stored value (the codec and the plain
fast path of :mod:`musubi_core._plain` both refuse deeper values). Decoding a value this deep
takes at most ~5 Python frames and 4 JSON levels per container: far within the default
recursion limit of 1000, and :func:`with_fresh_stack` gives it a whole stack when the caller
has used up its own."""

# Custom encoders registered by users: exact type -> function returning an encodable value.
_CUSTOM: dict[type, Callable[[Any], Any]] = {}


class TagError(TypeError):
    """Raised (and re-labelled by callers) when a value cannot be tagged."""

    def __init__(self, reason: str, path: tuple[str, ...] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.segments = path

    @property
    def path(self) -> str:
        return "$" + "".join(reversed(self.segments))

    def __str__(self) -> str:
        path = self.path
        if len(path) > 120:  # a path 100 containers deep: its two ends say where
            path = f"{path[:60]}...{path[-40:]}"
        return f"{self.reason} at {path}"


def register_encoder(cls: type, fn: Callable[[Any], Any]) -> None:
    """Teach identity hashing (and the codec) how to represent ``cls``.

    ``fn`` returns any encodable value; it is tagged with the class path so two
    types with the same representation still hash differently.
    """
    if not isinstance(cls, type):
        raise TypeError(f"register_encoder needs a class, got {cls!r}")
    _CUSTOM[cls] = fn


def registered_encoders() -> dict[type, Callable[[Any], Any]]:
    return dict(_CUSTOM)


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _canonical_sort_key(tree: Any) -> str:
    return json.dumps(tree, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _float(value: float) -> dict[str, str]:
    if math.isnan(value) or math.isinf(value):
        raise TagError(
            f"{value!r} has no stable identity or JSON form; replace it with None or a string"
        )
    return {"$float": repr(value)}


def encode(
    value: Any,
    *,
    canonical: bool,
    hook: Callable[[Any], Any] | None = None,
    max_depth: int = MAX_DEPTH,
) -> Any:
    """Return the tagged JSON-compatible tree for ``value``.

    ``hook`` is consulted first for every non-primitive object; if it returns
    something other than ``NotImplemented`` that is used as the tagged form
    (identity uses it to encode a ``Result`` as its artifact id). Containers nested more than
    ``max_depth`` deep raise a :class:`TagError` naming where.
    """
    return _enc(value, canonical, hook, _Open(max_depth))


def with_fresh_stack(fn: Callable[[A], T], arg: A) -> T:
    """``fn(arg)``; if it runs out of stack, ``fn(arg)`` again in a new thread (same context
    variables), whose stack is empty: a value within :data:`MAX_DEPTH` is encoded, hashed and
    decoded the same whether the caller is at the top of its stack or deep in a recursion.
    A ``RecursionError`` there too propagates (the value is deeper than the limit allows)."""
    try:
        return fn(arg)
    except RecursionError:
        pass  # leave the exhausted frames before starting again
    outcome: list[Any] = []
    context = contextvars.copy_context()

    def target() -> None:
        try:
            outcome.append((True, context.run(fn, arg)))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=target, name="musubi-fresh-stack", daemon=True)
    try:
        thread.start()
    except RuntimeError:  # no new threads at interpreter shutdown
        raise RecursionError("nesting too deep for the remaining stack") from None
    thread.join()
    ok, result = outcome[0]
    if ok:
        return result  # type: ignore[no-any-return]
    raise result


class _Open(set[int]):
    """The ids of the containers being encoded, root to here: a cycle is an id met again, and
    their number is the depth."""

    __slots__ = ("limit",)

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit


def _enc(v: Any, canonical: bool, hook: Callable[[Any], Any] | None, active: _Open) -> Any:
    t = type(v)
    # Fast path: the types that make up almost every prompt and payload.
    if t is str or t is int or t is bool or v is None:
        return v
    if t is float:
        return _float(v)
    if hook is not None:
        hooked = hook(v)
        if hooked is not NotImplemented:
            return hooked
    if t is list or t is tuple:
        return _enc_sequence(v, canonical, hook, active)
    if t is dict:
        return _enc_dict(v, canonical, hook, active)
    return _enc_other(v, canonical, hook, active)


def _enter(v: Any, active: _Open) -> int:
    marker = id(v)
    if marker in active:
        raise TagError("cycle detected: this container contains itself")
    if len(active) >= active.limit:
        raise TagError(
            f"nesting too deep (more than {active.limit} containers inside one another; "
            "flatten the value, or pass it as a JSON string)"
        )
    active.add(marker)
    return marker


def _enc_sequence(
    v: list[Any] | tuple[Any, ...],
    canonical: bool,
    hook: Callable[[Any], Any] | None,
    active: _Open,
) -> Any:
    marker = _enter(v, active)
    out = []
    for index, item in enumerate(v):
        try:
            out.append(_enc(item, canonical, hook, active))
        except TagError as err:
            err.segments = (*err.segments, f"[{index}]")
            raise
    active.discard(marker)
    return out if type(v) is list else {"$tuple": out}


def _key_label(key: Any) -> str:
    return f".{key}" if isinstance(key, str) and key.isidentifier() else f"[{key!r}]"


def _enc_dict(
    v: dict[Any, Any], canonical: bool, hook: Callable[[Any], Any] | None, active: _Open
) -> Any:
    marker = _enter(v, active)
    plain = all(type(k) is str and not k.startswith("$") for k in v)
    if plain:
        keys = sorted(v) if canonical else list(v)
        out: dict[str, Any] = {}
        for key in keys:
            try:
                out[key] = _enc(v[key], canonical, hook, active)
            except TagError as err:
                err.segments = (*err.segments, _key_label(key))
                raise
        active.discard(marker)
        return out
    pairs = []
    for key, item in v.items():
        try:
            pairs.append([_enc(key, canonical, hook, active), _enc(item, canonical, hook, active)])
        except TagError as err:
            err.segments = (*err.segments, _key_label(key))
            raise
    if canonical:
        pairs.sort(key=lambda pair: _canonical_sort_key(pair[0]))
    active.discard(marker)
    return {"$map": pairs}


def _enc_other(v: Any, canonical: bool, hook: Callable[[Any], Any] | None, active: _Open) -> Any:
    t = type(v)
    custom = _CUSTOM.get(t)
    if custom is not None:
        # Entered like a container: an encoder that returns its own input (or a chain of
        # objects that encode to one another) is a cycle or too deep, not a RecursionError.
        marker = _enter(v, active)
        tree = {"$custom": class_path(t), "value": _enc(custom(v), canonical, hook, active)}
        active.discard(marker)
        return tree
    # Checked before int/str so IntEnum/StrEnum members keep their class.
    if isinstance(v, enum.Enum):
        return {"$enum": class_path(t), "value": _enc(v.value, canonical, hook, active)}
    if isinstance(v, bytes | bytearray | memoryview):
        tag = "$bytes" if t is bytes else "$bytearray"
        return {tag: base64.b64encode(bytes(v)).decode("ascii")}
    if isinstance(v, dt.datetime):
        return {"$datetime": v.isoformat()}
    if isinstance(v, dt.date):
        return {"$date": v.isoformat()}
    if isinstance(v, dt.time):
        return {"$time": v.isoformat()}
    if isinstance(v, dt.timedelta):
        return {"$timedelta": [v.days, v.seconds, v.microseconds]}
    if isinstance(v, decimal.Decimal):
        if not v.is_finite():
            raise TagError(f"Decimal {v} has no stable identity; replace it with None or a string")
        return {"$decimal": str(v)}
    if isinstance(v, uuid.UUID):
        return {"$uuid": str(v)}
    if isinstance(v, pathlib.PurePath):
        return {"$path": v.as_posix()}
    if isinstance(v, set | frozenset):
        marker = _enter(v, active)
        try:
            items = [_enc(item, canonical, hook, active) for item in v]
        except TagError as err:
            err.segments = (*err.segments, "{member}")  # members have no stable index
            raise
        # Set order is arbitrary (hash-seed dependent), so sort in both modes.
        items.sort(key=_canonical_sort_key)
        active.discard(marker)
        return {"$frozenset" if isinstance(v, frozenset) else "$set": items}
    if isinstance(v, BaseModel):
        marker = _enter(v, active)
        try:
            # by_alias: model_validate() accepts aliases by default, field
            # names only when the model opts in, so aliases round-trip.
            fields = v.model_dump(mode="python", round_trip=True, by_alias=True)
        except Exception as exc:  # pydantic raises many types here
            raise TagError(f"pydantic model {t.__qualname__} could not be dumped: {exc}") from exc
        tree = {"$model": class_path(t), "fields": _enc(fields, canonical, hook, active)}
        active.discard(marker)
        return tree
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        marker = _enter(v, active)
        out: dict[str, Any] = {}
        for f in dataclasses.fields(v):
            try:
                out[f.name] = _enc(getattr(v, f.name), canonical, hook, active)
            except TagError as err:
                err.segments = (*err.segments, f".{f.name}")
                raise
        active.discard(marker)
        return {"$dataclass": class_path(t), "fields": out}
    if t is list or t is tuple or isinstance(v, list | tuple):
        # list/tuple subclasses (e.g. NamedTuple): keep the class for identity.
        inner = _enc_sequence(list(v), canonical, hook, active)
        return {"$seq": class_path(t), "items": inner}
    if isinstance(v, dict):
        return {"$mapping": class_path(t), "items": _enc_dict(dict(v), canonical, hook, active)}
    if isinstance(v, int | str):
        base = int if isinstance(v, int) else str
        return {"$scalar": class_path(t), "value": base(v)}
    if isinstance(v, float):
        return {"$scalar": class_path(t), "value": _float(float(v))}
    raise TagError(
        f"cannot encode object of type {t.__module__}.{t.__qualname__}; "
        "pass plain data, or call musubi_core.register_encoder"
        f"({t.__qualname__}, fn) to describe it"
    )
