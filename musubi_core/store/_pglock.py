"""Session-level PostgreSQL advisory locks: the ``flock`` of a store shared by many machines.

A :class:`PgSessionLock` holds ``pg_try_advisory_lock`` on a connection of its own (never
a pooled one: the lock lives exactly as long as that session). PostgreSQL drops it when the
session ends, however it ends: a released lock, a closed connection, or a holder that died
(``kill -9``: the kernel closes its socket and the server ends the session). So a crashed
worker's run or flight is taken over by the next one to try, without manual unlocking.

The lock key is 64 bits of SHA-256 over (schema, purpose, name): two stores in one
database (two schemas) never contend.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import weakref
from typing import Any

from ..errors import LockedError, StoreError

__all__ = ["PgFlightLocks", "PgSessionLock", "lock_key"]

# Locks held in this process: a fork() child must not use (or close) the parent's session.
_HELD: weakref.WeakSet[PgSessionLock] = weakref.WeakSet()


def _forget_inherited() -> None:
    for lock in list(_HELD):
        # Never close(): that would end the parent's session and release its lock.
        lock._conn = None


os.register_at_fork(after_in_child=_forget_inherited)


def _connect(dsn: str, timeout: float, path: str, purpose: str) -> Any:
    """A connection of its own (autocommit) for advisory locks, or a StoreError naming the
    server."""
    import psycopg

    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=max(1, int(timeout)))
    except psycopg.Error as exc:
        raise StoreError(
            f"cannot connect to {path} for {purpose}: {exc}; check that the PostgreSQL server "
            "is running and reachable",
            path=path,
        ) from exc


def lock_key(schema: str, purpose: str, name: str) -> int:
    """A signed 64-bit advisory-lock key for ``name`` (a run id, a node id)."""
    digest = hashlib.sha256(f"musubi\0{schema}\0{purpose}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class PgSessionLock:
    """An exclusive advisory lock, taken without waiting, held until :meth:`release`."""

    def __init__(
        self, dsn: str, key: int, *, path: str, run_id: str | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        self.dsn = dsn
        self.key = key
        self.path = path
        self.db_path = path
        self.run_id = run_id
        self._timeout = connect_timeout
        self._conn: Any = None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; False (at once) when another session holds it."""
        conn = _connect(self.dsn, self._timeout, self.path, "a lock")
        try:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
        except BaseException:
            conn.close()
            raise
        if not (row and row[0]):
            conn.close()
            return False
        self._conn = conn
        _HELD.add(self)
        return True

    def acquire(self) -> None:
        """Take the lock or raise :class:`LockedError` at once (never waits)."""
        if not self.try_acquire():
            raise LockedError(self.path, run_id=self.run_id)

    def release(self) -> None:
        conn, self._conn = self._conn, None
        _HELD.discard(self)
        if conn is None:
            return
        # Closing the session releases the lock (an unlock first only saves the server a step).
        with contextlib.suppress(Exception):
            conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
        with contextlib.suppress(Exception):
            conn.close()

    @property
    def held(self) -> bool:
        return self._conn is not None

    def __enter__(self) -> PgSessionLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class PgFlightLocks:
    """The flight primitive of a PostgreSQL store (see :mod:`musubi_core.flight`): advisory
    locks on one connection of this store object, so all the flights this process holds end
    with it (or with the process)."""

    def __init__(self, dsn: str, schema: str, *, path: str, connect_timeout: float = 10.0) -> None:
        self.dsn = dsn
        self.schema = schema
        self.path = path
        self._timeout = connect_timeout
        self._conn: Any = None
        self._pid = -1
        self._mutex = threading.Lock()

    def _connection(self) -> Any:
        if self._conn is not None and self._pid == os.getpid() and not self._conn.closed:
            return self._conn
        self._conn = _connect(self.dsn, self._timeout, self.path, "single flight")
        self._pid = os.getpid()
        return self._conn

    def try_lock(self, node_id: str) -> bool:
        import psycopg

        key = lock_key(self.schema, "flight", node_id)
        with self._mutex:
            try:
                row = self._connection().execute(
                    "SELECT pg_try_advisory_lock(%s)", (key,)
                ).fetchone()
            except psycopg.Error as exc:
                # A lost session lost its locks too: the next call connects again.
                self._drop()
                raise StoreError(f"single flight on {self.path}: {exc}", path=self.path) from exc
            return bool(row and row[0])

    def unlock(self, node_id: str) -> None:
        key = lock_key(self.schema, "flight", node_id)
        with self._mutex:
            if self._conn is None or self._pid != os.getpid():
                return
            try:
                self._conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
            except Exception:
                self._drop()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                conn.close()

    def close(self) -> None:
        with self._mutex:
            self._drop()
