"""Single flight: when several workers reach the same missing node at once, one executes it
and the others wait for its result.

Opt-in (``@step(single_flight=True)``, ``MusubiCache(single_flight=True)``,
``instrument(..., single_flight=True)``), on both stores. A *flight* is an exclusive lock on
one node id, shared by every worker of the store:

* across processes, the store's :meth:`flight_locks` primitive: on SQLite a POSIX record lock
  on one byte (chosen by the node id) of the sidecar file ``<store>.flights``; on PostgreSQL a
  session-level advisory lock on one connection per store object. The kernel, or the server,
  drops either when its holder dies (``kill -9`` included), so a dead holder releases its
  flights;
* across threads of one process, a table of the node ids this process is executing (record
  locks and advisory locks are both per process, or per session).

A waiter polls: is the result stored (then it replays it), or is the flight free (then it
takes it, looks once more, and executes only if the result is still missing)? The wait is
bounded (``timeout``); past it the waiter executes itself, with one warning.

>>> import os, tempfile
>>> from musubi_core.store import SQLiteStore
>>> store = SQLiteStore(os.path.join(tempfile.mkdtemp(), "m.db"))
>>> flights = flights_for(store)
>>> flights.try_claim("n1"), flights.try_claim("n1")
(True, False)
>>> flights.release("n1"); flights.try_claim("n1")
True
>>> flights.release("n1"); store.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

__all__ = ["DEFAULT_TIMEOUT", "FileFlightLocks", "FlightLocks", "SingleFlight", "flights_for"]

T = TypeVar("T")

# How long a waiter waits for another worker's execution before running the call itself.
DEFAULT_TIMEOUT = 300.0
_POLL_FIRST, _POLL_MAX = 0.02, 0.25


def _pauses(timeout: float) -> Iterator[float]:
    """Pauses between a waiter's attempts (growing to ``_POLL_MAX``) until ``timeout``."""
    deadline, pause = time.monotonic() + timeout, _POLL_FIRST
    while time.monotonic() < deadline:
        yield pause
        pause = min(_POLL_MAX, pause * 1.5)


class FlightLocks(Protocol):
    """A store's cross-process flight primitive (non-blocking, per process)."""

    def try_lock(self, node_id: str) -> bool: ...

    def unlock(self, node_id: str) -> None: ...

    def close(self) -> None: ...


def _offset(node_id: str) -> int:
    # One byte per node id among 2**40: collisions only make two flights share a lock.
    return int(node_id[:10], 16) if all(c in "0123456789abcdef" for c in node_id[:10]) else (
        hash(node_id) & (2**40 - 1)
    )


class FileFlightLocks:
    """Record locks (``lockf``) on bytes of ``<store>.flights``, one descriptor per process.

    The descriptor is never closed while the store is open: closing any descriptor of a file
    drops every record lock the process holds on it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._pid = -1
        self._mutex = threading.Lock()

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            # A fork child does not inherit record locks; it opens its own descriptor.
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            self._pid = os.getpid()
        return self._fd

    def try_lock(self, node_id: str) -> bool:
        with self._mutex:
            fd = self._descriptor()
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _offset(node_id))
            except OSError:
                return False
            return True

    def unlock(self, node_id: str) -> None:
        with self._mutex:
            if self._fd is not None and self._pid == os.getpid():
                with contextlib.suppress(OSError):
                    fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _offset(node_id))

    def close(self) -> None:
        with self._mutex:
            fd, self._fd = self._fd, None
            if fd is not None and self._pid == os.getpid():
                with contextlib.suppress(OSError):
                    os.close(fd)


class _ThisProcessOnly:
    """No cross-process lock: :class:`SingleFlight`'s own table serialises threads."""

    def try_lock(self, node_id: str) -> bool:
        return True

    def unlock(self, node_id: str) -> None:
        pass

    def close(self) -> None:
        pass


class SingleFlight:
    """Flights of one store object (see the module docstring)."""

    def __init__(self, locks: FlightLocks) -> None:
        self._locks = locks
        self._mine: set[str] = set()  # node ids this process holds a flight for
        self._mutex = threading.Lock()
        self._warned = False

    def try_claim(self, node_id: str) -> bool:
        """Take the flight of ``node_id`` if no thread or process holds it (never waits)."""
        with self._mutex:
            if node_id in self._mine:
                return False
            self._mine.add(node_id)
        try:
            if self._locks.try_lock(node_id):
                return True
        except Exception:
            # The lock could not be asked (a server away): execute without a flight.
            with self._mutex:
                self._mine.discard(node_id)
            raise
        with self._mutex:
            self._mine.discard(node_id)
        return False

    def release(self, node_id: str) -> None:
        with self._mutex:
            if node_id not in self._mine:
                return
            self._mine.discard(node_id)
        with contextlib.suppress(Exception):
            self._locks.unlock(node_id)

    def _timed_out(
        self, node_id: str, timeout: float, category: type[Warning]
    ) -> tuple[None, bool]:
        """Past the wait: execute without the flight (one warning per store object)."""
        with self._mutex:
            first, self._warned = not self._warned, True
        if first:
            warnings.warn(
                f"musubi single flight: waited {timeout:.0f}s for another worker executing node "
                f"{node_id[:12]}; executing it here too (raise the timeout if such calls take "
                "longer; further timeouts are not reported)",
                category,
                stacklevel=4,
            )
        return None, False

    def wait_or_claim(
        self, node_id: str, ready: Callable[[], T | None], *, timeout: float = DEFAULT_TIMEOUT,
        category: type[Warning] = UserWarning,
    ) -> tuple[T | None, bool]:
        """``(result, False)`` once another worker stored it; ``(None, True)`` when this call
        holds the flight and must execute (then :meth:`release`); ``(None, False)`` after
        ``timeout`` (execute without the flight) or when the lock cannot be asked."""
        for pause in _pauses(timeout):
            state = self._attempt(node_id, ready)
            if state is not None:
                return state
            time.sleep(pause)
        return self._timed_out(node_id, timeout, category)

    async def await_or_claim(
        self, node_id: str, ready: Callable[[], T | None], *, timeout: float = DEFAULT_TIMEOUT,
        category: type[Warning] = UserWarning,
    ) -> tuple[T | None, bool]:
        """Async :meth:`wait_or_claim` (the event loop keeps running while it waits)."""
        for pause in _pauses(timeout):
            state = self._attempt(node_id, ready)
            if state is not None:
                return state
            await asyncio.sleep(pause)
        return self._timed_out(node_id, timeout, category)

    def _attempt(self, node_id: str, ready: Callable[[], T | None]) -> tuple[T | None, bool] | None:
        try:
            claimed = self.try_claim(node_id)
        except Exception:
            return None, False
        found = ready()
        if found is not None:
            if claimed:
                self.release(node_id)
            return found, False
        return (None, True) if claimed else None

    def close(self) -> None:
        self._locks.close()


def flights_for(store: Any) -> SingleFlight:
    """The :class:`SingleFlight` of ``store`` (one per store object, closed with it)."""
    with _CREATE:
        flights: SingleFlight | None = store.__dict__.get("_single_flight")
        if flights is None:
            # A store of another kind (a custom Store) gets flights among this process's
            # threads only.
            make = getattr(store, "flight_locks", None)
            flights = SingleFlight(make() if make is not None else _ThisProcessOnly())
            store.__dict__["_single_flight"] = flights
            hook = getattr(store, "add_close_hook", None)
            if hook is not None:
                hook(flights.close)
    return flights


_CREATE = threading.Lock()
