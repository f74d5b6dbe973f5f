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
import weakref
from collections.abc import Callable
from typing import TypeVar

from musubi_core import Engine, MusubiError, get_engine
from musubi_core.flight import DEFAULT_TIMEOUT as FLIGHT_TIMEOUT
from musubi_core.identity import resolve_namespace
from musubi_core.modes import Mode, resolve_mode
from musubi_core.store import open_store

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
        # One warning per error class, whatever the operation: a broken store otherwise
        # warns on every get/put of an ingestion run.
        warn_once(
            f"store:{type(exc).__name__}",
            f"{topic} failed ({type(exc).__name__}: {exc}); continuing without replay/recording",
        )
        return default


class Runtime:
    """Which engine the adapter uses: a fixed one (path or engine given) or the context one
    (viewed in the runtime's namespace)."""

    def __init__(
        self,
        path: str | None = None,
        *,
        engine: Engine | None = None,
        namespace: str | None = None,
        ttl_seconds: float | None = None,
        mode: Mode | str | None = None,
        single_flight: bool = False,
        single_flight_timeout: float = FLIGHT_TIMEOUT,
    ) -> None:
        self.path = str(path) if path is not None else None
        self.ttl_seconds = ttl_seconds
        # Workers missing the same LLM call at once: one executes, the others wait for it
        # (musubi_llama_index._flight).
        self.single_flight = single_flight
        self.single_flight_timeout = single_flight_timeout
        self.namespace = resolve_namespace(namespace, engine.namespace if engine else None)
        # replay: a call with no recording raises ReplayMissError (see _replay / _embed).
        self.mode: Mode = resolve_mode(mode, engine.mode if engine else None)
        self._open_lock = threading.Lock()
        self._engine: Engine | None = engine
        # path and engine not given: the context engine of another namespace, viewed in ours
        # (the same store and recorder), by the engine it views.
        self._views: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()
        # path given: opened on first use, so a broken path degrades to misses + one warning
        # (inside guarded calls) instead of failing instrument() itself.
        self._own = engine is None and path is not None

    def engine(self) -> Engine:
        if self._engine is not None:
            return self._engine
        if self.path is None:
            context = get_engine()  # use_engine() context, else the process default
            if context.namespace == self.namespace and context.mode is self.mode:
                return context
            view = self._views.get(context)
            if view is None:
                with self._open_lock:
                    view = self._views.get(context)
                    if view is None:
                        view = Engine(
                            context.store,
                            codec=context.codec,
                            namespace=self.namespace,
                            mode=self.mode,
                        )
                        self._views[context] = view
            return view
        with self._open_lock:
            if self._engine is None:
                self._engine = Engine(
                    open_store(self.path), namespace=self.namespace, mode=self.mode
                )
            return self._engine

    def close(self) -> None:
        """Flush buffered writes; close the engine if this runtime opened it."""
        eng = self._engine
        if eng is None:
            if self.path is None:
                self.flush()
            return
        guarded(eng.flush, None, topic="flush")
        if self._own:
            guarded(eng.close, None, topic="close")
            self._engine = None

    def flush(self) -> None:
        guarded(lambda: self.engine().flush(), None, topic="flush")
