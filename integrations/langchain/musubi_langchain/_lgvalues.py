"""What a LangGraph node-cache entry stores, and how it is read back, without pickle.

A cached node execution is the node's *writes*: a list of ``(channel, value)`` pairs. They are
stored through musubi's codec (tagged JSON: plain data, tuples, dates, allow-listed pydantic
models and dataclasses). A value the codec refuses (a LangChain message, a ``Send``, a class
not allow-listed) is packed with LangGraph's own msgpack serializer instead, and read back by a
*strict* decoder: an extension naming a class outside the allow-list (LangGraph's safe types,
musubi's allow-list, the cache's ``allow=``) is an error, never constructed, and a ``pickle``
payload is never read (only msgpack is ever decoded). A packed value is stored only if the
strict decoder gives back a value equal to it, so what replays is what the node returned.

Example:
    >>> from langchain_core.messages import AIMessage
    >>> from musubi_core.codec import JSONCodec
    >>> values = NodeValues(())
    >>> stored = values.storable([("messages", [AIMessage("hi")])], JSONCodec())
    >>> values.load(stored)[0][1][0].content
    'hi'
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable
from typing import Any

import ormsgpack
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from musubi_core.codec import Codec, allowed_classes
from musubi_core.errors import SerializationError

try:  # LangGraph's list of types a checkpoint may rebuild (messages, Send, datetime, ...)
    from langgraph.checkpoint.serde._msgpack import SAFE_MSGPACK_METHODS, SAFE_MSGPACK_TYPES
except ImportError:  # pragma: no cover - another langgraph-checkpoint layout
    SAFE_MSGPACK_TYPES = frozenset()
    SAFE_MSGPACK_METHODS = frozenset()

__all__ = ["MSGPACK_MARK", "NodeValues", "Unstorable"]

# The one key of the dict that holds a value packed with msgpack (bytes).
MSGPACK_MARK = "__musubi_langgraph_msgpack__"
# msgpack extension codes of LangGraph's serializer (jsonplus.py) that construct a class
# named by (module, name, ...); 3 calls a method of one.
_CONSTRUCTORS = frozenset({0, 1, 2, 4, 5})
_METHOD = 3
_OPTION = ormsgpack.OPT_NON_STR_KEYS


class Unstorable(ValueError):
    """A node's writes that neither musubi's codec nor the strict msgpack path can store."""


class _Blocked(ValueError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        _why.reason = reason


# The reason the strict hook refused an extension, per thread (see NodeValues._unpack).
_why = threading.local()


def _class_key(cls: type) -> tuple[str, str]:
    return (cls.__module__, cls.__name__)


class NodeValues:
    """Stores and loads node writes (see the module docstring)."""

    def __init__(self, allow: Iterable[type]) -> None:
        self._allow = frozenset(_class_key(c) for c in allow)

    def _allowed(self) -> frozenset[tuple[str, ...]]:
        extra = frozenset(_class_key(c) for c in allowed_classes())
        return frozenset(SAFE_MSGPACK_TYPES) | self._allow | extra

    def storable(self, writes: Any, codec: Codec) -> Any:
        """``writes`` as ``engine.record`` should get them: as they are when the codec stores
        them, else packed (raises :class:`Unstorable`, naming why, when neither can)."""
        try:
            codec.encode(writes)
            return writes
        except SerializationError as err:
            refused = err
        serde = JsonPlusSerializer(pickle_fallback=False)
        try:
            kind, data = serde.dumps_typed(writes)
        except Exception as exc:
            raise Unstorable(f"{refused}; msgpack: {type(exc).__name__}: {exc}") from None
        if kind != "msgpack":
            raise Unstorable(str(refused))
        try:
            same = _pairs(self._unpack(data)) == _pairs(writes)
        except Exception as exc:
            raise Unstorable(f"{refused}; and it cannot be read back safely: {exc}") from None
        if not same:
            raise Unstorable(f"{refused}; and it does not read back equal to what it was")
        return {MSGPACK_MARK: data}

    def load(self, stored: Any) -> Any:
        """The writes ``stored`` holds (raises on a packed value that names a class outside the
        allow-list, or that is not msgpack)."""
        if type(stored) is dict and len(stored) == 1 and MSGPACK_MARK in stored:
            data = stored[MSGPACK_MARK]
            if not isinstance(data, bytes):
                raise ValueError("a packed node value must hold bytes")
            return _pairs(self._unpack(data))
        return stored

    def _unpack(self, data: bytes) -> Any:
        allowed = self._allowed()
        _why.reason = None
        try:
            return ormsgpack.unpackb(data, ext_hook=_strict_hook(allowed), option=_OPTION)
        except Exception as exc:
            # ormsgpack reports a failing hook as "ext_hook failed": name the hook's reason.
            reason = _why.reason
            if reason is not None:
                raise _Blocked(reason) from None
            raise ValueError(f"not a value musubi stored: {exc}") from None


def _pairs(writes: Any) -> Any:
    """Writes as a list of ``(channel, value)`` tuples (msgpack reads a tuple back as a list)."""
    if isinstance(writes, list | tuple) and all(
        isinstance(w, list | tuple) and len(w) == 2 and isinstance(w[0], str) for w in writes
    ):
        return [tuple(w) for w in writes]
    return writes


@functools.lru_cache(maxsize=8)
def _strict_hook(allowed: frozenset[tuple[str, ...]]) -> Callable[[int, bytes], Any]:
    """An ext hook that refuses every extension naming a class (or method) not in ``allowed``
    before LangGraph's own hook (built with the same allow-list) constructs anything."""
    base: Callable[[int, bytes], Any] | None = getattr(
        JsonPlusSerializer(pickle_fallback=False, allowed_msgpack_modules=list(allowed)),
        "_unpack_ext_hook",
        None,
    )

    def hook(code: int, data: bytes) -> Any:
        if base is None:
            raise _Blocked("this langgraph-checkpoint has no msgpack extension hook")
        if code in _CONSTRUCTORS or code == _METHOD:
            head = ormsgpack.unpackb(data, ext_hook=hook, option=_OPTION)
            if not isinstance(head, list | tuple) or len(head) < 3:
                raise _Blocked(f"malformed msgpack extension {code}")
            name = (head[0], head[1], head[3]) if code == _METHOD and len(head) > 3 else None
            if code == _METHOD:
                if name not in SAFE_MSGPACK_METHODS:
                    raise _Blocked(f"method {head[:2]} is not allowed")
            elif (head[0], head[1]) not in allowed:
                raise _Blocked(
                    f"class {head[0]}.{head[1]} is not allow-listed: call "
                    "musubi_core.allow(...) with it, or pass it to MusubiNodeCache(allow=...)"
                )
            return base(code, data)
        raise _Blocked(f"msgpack extension {code} is not read by musubi")

    return hook
