"""Engine resolution and the "never break the host" guard shared by the cache and handler.

Every store call an adapter makes goes through :class:`Guard`: a store error (disk full, file
read-only or deleted, schema mismatch) becomes a miss / a skipped record plus ONE warning per
object, so LangChain keeps answering from the provider.

Example:
    >>> g = Guard("demo")
    >>> g.call(lambda: 1 / 0, default=None) is None  # warns once, returns the default
    True
"""

from __future__ import annotations

import os
import sqlite3
import threading
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from musubi_core.engine import Engine, get_engine
from musubi_core.errors import MusubiError
from musubi_core.store import SQLiteStore

T = TypeVar("T")

# What a store failure can look like from the outside. Anything else raised by our own code is a
# bug, but it still must not reach LangChain, so the guard catches Exception and says so.
STORE_ERRORS: tuple[type[BaseException], ...] = (MusubiError, sqlite3.Error, OSError)


class MusubiLangChainWarning(UserWarning):
    """musubi could not read or write its store; LangChain continues without it."""


def make_engine(
    path: str | os.PathLike[str] | None, store: Any | None, namespace: str
) -> Engine:
    """The engine for ``path``/``store``; neither given means the process default engine
    (``$MUSUBI_DB`` or ``.musubi/musubi.db``) viewed under ``namespace``."""
    if store is not None:
        return Engine(store, namespace=namespace)
    if path is not None:
        return Engine(SQLiteStore(path), namespace=namespace)
    default = get_engine()
    if default.namespace == namespace:
        return default
    return Engine(default.store, namespace=namespace)


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
