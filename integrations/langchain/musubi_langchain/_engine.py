"""Engine resolution, the JSON fast paths, and the "never break the host" guard shared by the
cache and the handler.

Every store call an adapter makes goes through :class:`Guard`: a store error (disk full, file
read-only or deleted, schema mismatch) becomes a miss / a skipped record plus ONE warning per
object, so LangChain keeps answering from the provider.

Example:
    >>> g = Guard("demo")
    >>> g.call(lambda: 1 / 0, default=None) is None  # warns once, returns the default
    True
"""

from __future__ import annotations

import json
import json.encoder
import os
import sqlite3
import threading
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from musubi_core.codec import JSON_ENCODING, JSONCodec
from musubi_core.engine import Engine, get_engine
from musubi_core.errors import MusubiError
from musubi_core.fastpath import NOT_PLAIN, plain_tree
from musubi_core.modes import Mode
from musubi_core.store import open_store

T = TypeVar("T")

# What a store failure can look like from the outside. Anything else raised by our own code is a
# bug, but it still must not reach LangChain, so the guard catches Exception and says so.
STORE_ERRORS: tuple[type[BaseException], ...] = (MusubiError, sqlite3.Error, OSError)


class MusubiLangChainWarning(UserWarning):
    """musubi could not read or write its store; LangChain continues without it."""


def _json_text(*, sort_keys: bool) -> Callable[[Any], str]:
    """``json.JSONEncoder(sort_keys=..., separators=(",", ":"), ensure_ascii=False).encode``
    with its C encoder made once instead of per call (the same text: these are the settings of
    ``musubi_core.fastpath``'s canonical and payload encoders)."""
    encoder = json.JSONEncoder(sort_keys=sort_keys, separators=(",", ":"), ensure_ascii=False)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return encoder.encode
    # (markers, default, encoder, indent, key_separator, item_separator, sort_keys, skipkeys,
    # allow_nan), as JSONEncoder.iterencode passes them, but without the circular-reference
    # markers (state shared by every caller): a plain tree is acyclic (``plain_tree`` recurses
    # through it first), so the instance keeps no state and serves every thread.
    iterencode = make(
        None,
        encoder.default,
        json.encoder.encode_basestring,
        None,
        ":",
        ",",
        sort_keys,
        False,
        True,
    )

    def text(value: Any) -> str:
        return "".join(iterencode(value, 0))

    return text


# Text of a plain tree (see ``musubi_core.fastpath.plain_tree``): canonical (sorted keys, what
# ``plain_input_hash`` hashes) and compact (what ``plain_payload`` stores).
canonical_json = _json_text(sort_keys=True)
compact_json = _json_text(sort_keys=False)


class Precoded:
    """A value already encoded as the JSONCodec would encode it (see :class:`PlainAwareCodec`)."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


class PlainAwareCodec(JSONCodec):
    """The JSON codec, taking :class:`Precoded` values as they are (same encoding, same bytes:
    any engine decodes what it wrote)."""

    def encode(self, value: Any) -> tuple[str, bytes]:
        if type(value) is Precoded:
            return JSON_ENCODING, value.payload
        return super().encode(value)


def storable(engine: Engine, plain: Any) -> Any:
    """``plain`` (already reduced to JSON-shaped data) as ``engine.record`` should get it:
    pre-encoded by the C JSON encoder when the engine's codec accepts that, else as is."""
    if type(engine.codec) is PlainAwareCodec:
        tree = plain_tree(plain)
        if tree is not NOT_PLAIN:
            try:
                return Precoded(compact_json(tree).encode("utf-8", "surrogatepass"))
            except ValueError:  # e.g. an int too long to print: the codec says why
                return plain
    return plain


def make_engine(
    path: str | os.PathLike[str] | None,
    store: Any | None,
    namespace: str,
    mode: Mode | None = None,
) -> Engine:
    """The engine for ``path``/``store``; neither given means the process default engine
    (``$MUSUBI_DB`` or ``.musubi/musubi.db``) viewed under ``namespace`` (and ``mode``, when
    given). Whatever the engine, its writes go through the store's one recorder (committed in
    the background)."""
    if store is None and path is None:
        default = get_engine()
        if default.namespace == namespace and mode in (None, default.mode):
            return default
        store = default.store
    engine = Engine(
        store if store is not None else open_store(os.fspath(path)),  # type: ignore[arg-type]
        codec=PlainAwareCodec(),
        namespace=namespace,
        mode=mode,
    )
    # A read-only store or a garbled node: the engine's warning is LangChain's (the cache and
    # the handler then see no error, so they add none).
    engine.warning_category = MusubiLangChainWarning
    return engine


class Guard:
    """Runs store calls, turning failures into a default value and a single warning."""

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._warned = False
        self._lock = threading.Lock()

    @property
    def warned(self) -> bool:
        return self._warned

    def warn(self, exc: BaseException) -> None:
        with self._lock:
            if self._warned:
                return
            self._warned = True
        kind = "store error" if isinstance(exc, STORE_ERRORS) else "internal error"
        warnings.warn(
            f"musubi {self._owner}: {kind} ({type(exc).__name__}: {exc}); continuing without "
            "replay/recording for the affected calls (further errors are not reported)",
            MusubiLangChainWarning,
            stacklevel=3,
        )

    def call(self, fn: Callable[[], T], default: T) -> T:
        try:
            return fn()
        except Exception as exc:
            self.warn(exc)
            return default
