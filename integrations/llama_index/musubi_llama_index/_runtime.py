"""The adapter's connection to the musubi engine, and its never-raise discipline.

Every store call made on behalf of LlamaIndex goes through :func:`guarded`: a store failure
(full disk, read-only file, locked database, a value the codec refuses) becomes a miss or a
skipped record, with a single warning per process and error class, so the host framework keeps
working exactly as it would without musubi.

Example::

    rt = Runtime(path="cache.db")
    hit = guarded(lambda: rt.engine().lookup(key), default=None)
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from musubi_core import Engine, MusubiError, SQLiteStore, get_engine

__all__ = ["Runtime", "guarded", "warn_once"]

log = logging.getLogger("musubi.llama_index")
T = TypeVar("T")

_warned: set[str] = set()
_warned_lock = threading.Lock()


def warn_once(topic: str, message: str) -> None:
    """Emit ``message`` once per process for ``topic`` (then only debug logs)."""
    with _warned_lock:
        first = topic not in _warned
        _warned.add(topic)
    if first:
        warnings.warn(f"musubi (llama_index): {message}", RuntimeWarning, stacklevel=3)
    else:
        log.debug("musubi (llama_index): %s", message)


def guarded(fn: Callable[[], T], default: T, *, topic: str = "store") -> T:
    """Run a store operation; on any musubi/sqlite/OS/codec failure warn once, return default."""
    try:
        return fn()
    except (MusubiError, sqlite3.Error, OSError, TypeError, ValueError) as exc:
        warn_once(
            f"{topic}:{type(exc).__name__}",
            f"{topic} failed ({type(exc).__name__}: {exc}); continuing without replay/recording",
        )
        return default


class Runtime:
    """Which engine the adapter uses: a fixed one (path or engine given) or the context one."""

    def __init__(
        self,
        path: str | None = None,
        *,
        engine: Engine | None = None,
        namespace: str = "default",
        ttl_seconds: float | None = None,
    ) -> None:
        self._own = False
        self.ttl_seconds = ttl_seconds
        if engine is not None:
            self._engine: Engine | None = engine
        elif path is not None:
            self._engine = Engine(SQLiteStore(str(path)), namespace=namespace)
            self._own = True
        else:
            self._engine = None  # resolved per call: use_engine() context, else process default

    def engine(self) -> Engine:
        return self._engine if self._engine is not None else get_engine()

    def close(self) -> None:
        if self._engine is not None:
            eng = self._engine
            guarded(eng.flush, None, topic="flush")
            if self._own:
                guarded(eng.close, None, topic="close")

    def flush(self) -> None:
        guarded(self.engine().flush, None, topic="flush")


def describe(exc: Any) -> str:
    return f"{type(exc).__name__}: {exc}"
