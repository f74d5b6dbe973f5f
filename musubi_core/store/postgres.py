"""The PostgreSQL store: one store shared by many workers on many machines.

Same schema, same statements and the same conformance suite as the SQLite
store; only connections, transactions and locking differ. Requires
``pip install "musubi-lineage[postgres]"`` (psycopg 3).

Durable runs (:func:`musubi_core.run`) work here too: their one-writer lock is
a session-level advisory lock (:mod:`._pglock`), dropped when its holder's
connection ends.

>>> store = PostgresStore("postgresql://localhost/musubi")   # doctest: +SKIP
>>> Engine(store)                                             # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from ..errors import SchemaError, StoreError
from ._pglock import PgFlightLocks, PgSessionLock, lock_key
from ._sqlbase import SQLStoreBase
from .schema import (
    APP_ID,
    DDL,
    SCHEMA_VERSION,
    check_version,
    migration_statements,
    stored_version,
)
from .sqlite_runs import RunStoreMixin

__all__ = ["PostgresStore"]

# The pool logs each failed reconnection attempt; a store that cannot reach its server says so
# once, as a StoreError (or an adapter's one warning). Configured logging still sees them.
logging.getLogger("psycopg.pool").addHandler(logging.NullHandler())

T = TypeVar("T")


def _pg_types(sql: str) -> str:
    """The SQLite DDL in PostgreSQL's types: one schema definition, two dialects."""
    return (
        sql.replace(" WITHOUT ROWID", "")
        .replace(" REAL", " DOUBLE PRECISION")
        .replace(" BLOB", " BYTEA")
        .replace(" INTEGER", " BIGINT")
    )


PG_DDL = _pg_types(DDL)

# SQLSTATEs of a transaction PostgreSQL aborted only because it collided with another one:
# running it again is correct (it was rolled back whole) and almost always succeeds.
_RETRYABLE = {"40P01": "deadlock", "40001": "serialization failure"}
WRITE_ATTEMPTS = 10

_NAMED = re.compile(r":([a-z_]+)\b")
_ABANDONED: list[Any] = []  # connections inherited across fork: never used, never closed


@functools.lru_cache(maxsize=512)
def _translate(sql: str) -> str:
    """``?`` and ``:name`` placeholders to psycopg's ``%s`` and ``%(name)s``."""
    sql = sql.replace("%", "%%").replace("?", "%s")
    return _NAMED.sub(r"%(\1)s", sql)


def _redact(dsn: str) -> str:
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", re.sub(r"password=\S+", "password=***", dsn))


class PostgresStore(RunStoreMixin, SQLStoreBase):
    """musubi's store on PostgreSQL (psycopg 3).

    ``dsn`` is a libpq connection string or URL. ``schema`` keeps musubi's
    tables in their own PostgreSQL schema (created if missing), so one
    database can hold several stores. ``path`` (used in messages and by the
    CLI) is the DSN with its password hidden.
    """

    # CAST(x AS BIGINT) rounds here (SQLite's truncates): time buckets floor instead.
    _FLOOR = "FLOOR({})"

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "musubi",
        timeout: float = 60.0,
        pool_size: int = 8,
        reconnect_timeout: float = 10.0,
    ) -> None:
        try:
            import psycopg
            import psycopg_pool
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                'PostgresStore needs psycopg 3 and psycopg_pool: pip install "musubi-lineage[postgres]"'
            ) from exc
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", schema):
            raise ValueError(f"schema must be a plain identifier, got {schema!r}")
        self._psycopg = psycopg
        self._pool_module = psycopg_pool
        self.dsn = dsn
        self.schema = schema
        self.path = f"{_redact(dsn)} (schema {schema})"
        self._timeout = timeout
        self._pool_size = max(1, pool_size)
        # How long an operation keeps trying to reach a server that went away (a restart, a
        # failover) before it raises StoreError.
        self.reconnect_timeout = reconnect_timeout
        self._pool: Any = None
        self._pool_pid = -1
        self._pool_lock = threading.Lock()
        self._closed = False
        # Transactions retried after a deadlock or serialization failure, and operations
        # retried after a lost connection (diagnostics).
        self.retries = 0
        self.reconnects = 0
        # A wrong address or password says so at once (later, a server that went away is
        # waited for, up to reconnect_timeout).
        why = self._probe()
        if why is not None:
            raise StoreError(
                f"cannot connect to {self.path}: {why}; check the URL (host, port, user, "
                "password, database) and that the server is running",
                path=self.path,
            )
        self._initialise()

    # -- connections ----------------------------------------------------------------

    def _configure(self, conn: Any) -> None:
        # Wait for row locks instead of failing, like SQLite's busy_timeout.
        conn.execute(f"SET lock_timeout = '{int(self._timeout * 1000)}ms'")
        conn.execute(f'SET search_path TO "{self.schema}"')

    def _connections(self) -> Any:
        """This process's pool (autocommit connections: a read is one round trip; a write is
        one explicit transaction). A fork child opens its own: libpq connections must not be
        shared with the parent, nor closed by the child (that would end the parent's)."""
        pool = self._pool
        if pool is not None and self._pool_pid == os.getpid():
            return pool
        with self._pool_lock:
            if self._closed:
                raise StoreError(f"store {self.path} is closed", path=self.path)
            if self._pool is not None and self._pool_pid != os.getpid():
                _ABANDONED.append(self._pool)
                self._pool = None
            if self._pool is None:
                pool = self._pool_module.ConnectionPool(
                    self.dsn,
                    min_size=1,
                    max_size=self._pool_size,
                    kwargs={"autocommit": True, "connect_timeout": max(1, int(self._timeout))},
                    configure=self._configure,
                    timeout=self.reconnect_timeout,
                    name=f"musubi-{self.schema}",
                    open=False,
                )
                pool.open(wait=False)
                self._pool, self._pool_pid = pool, os.getpid()
            return self._pool

    def _probe(self) -> BaseException | None:
        """One direct connection attempt: None if the server answers, else why not."""
        try:
            self._psycopg.connect(self.dsn, connect_timeout=2).close()
        except self._psycopg.Error as exc:
            return exc
        return None

    def _renew_pool(self, stale: Any) -> None:
        """Replace a pool that is backing off after failed reconnections to a server that is
        reachable again (its next attempt may be many seconds away)."""
        with self._pool_lock:
            if self._pool is not stale or self._closed:
                return
            self._pool = None
        if self._pool_pid == os.getpid():
            threading.Thread(target=stale.close, daemon=True).start()

    def _unreachable(self, action: str, exc: BaseException) -> StoreError:
        return StoreError(
            f"{action} failed: cannot reach the PostgreSQL server of {self.path} (tried for "
            f"{self.reconnect_timeout:g}s: {exc}); check that the server is running and "
            "reachable, or raise PostgresStore(reconnect_timeout=...)",
            path=self.path,
        )

    def _attempt(self, action: str, fn: Callable[[Any], T], *, transaction: bool) -> T:
        """Run ``fn`` on a pooled connection; a connection lost before ``fn`` could change
        anything (the pool handed out one the server had closed, or none could be made) is
        replaced and ``fn`` runs again, until ``reconnect_timeout``. A read is retried
        whenever its connection is lost (reading twice is harmless)."""
        deadline = time.monotonic() + self.reconnect_timeout
        pause = 0.02
        while True:
            started = False
            pool = self._connections()
            try:
                with pool.connection() as conn:
                    if not transaction:
                        return fn(conn)
                    with conn.transaction():
                        started = True
                        return fn(conn)
            except self._pool_module.PoolTimeout as exc:
                if self._closed:
                    raise StoreError(f"store {self.path} is closed", path=self.path) from exc
                # The pool only says it waited: a direct attempt says why (refused, auth...),
                # or that the server is back while the pool backs off.
                why = self._probe()
                if why is not None or time.monotonic() > deadline + self.reconnect_timeout:
                    raise self._unreachable(action, why or exc) from exc
                self._renew_pool(pool)
            except self._psycopg.OperationalError as exc:
                lost = getattr(exc, "sqlstate", None) is None or str(
                    getattr(exc, "sqlstate", "")
                ).startswith(("08", "57P"))
                if not lost or started:
                    # Lost inside a transaction: it may have committed. The caller decides
                    # (the recorder retries its batch; an adapter degrades to a miss).
                    raise
                if time.monotonic() + pause > deadline:
                    raise self._unreachable(action, exc) from exc
                self.reconnects += 1
                time.sleep(pause)
                pause = min(1.0, pause * 2)

    def _initialise(self) -> None:
        def setup(c: Any) -> None:
            # One initialiser at a time, across processes and machines.
            c.execute("SELECT pg_advisory_xact_lock(hashtext('musubi-schema-' || %s))", (self.schema,))
            c.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            tables = {
                row[0]
                for row in c.execute(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                    (self.schema,),
                ).fetchall()
            }
            if check_version(c, self.path, tables):
                return
            found = stored_version(c, tables)
            for statement in migration_statements(found) if found else ():
                c.execute(_pg_types(statement))
            for statement in PG_DDL.split(";\n"):
                if statement.strip():
                    c.execute(statement)
            c.cursor().executemany(
                "INSERT INTO musubi_meta (key, value) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                [
                    ("app", APP_ID),
                    ("hash_scheme", "musubi/1"),
                    ("created_at", repr(time.time())),
                ],
            )
            c.execute(
                "INSERT INTO musubi_meta (key, value) VALUES ('schema_version', %s) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )

        try:
            self._write("initialise", setup)
        except SchemaError:
            self.close()
            raise

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except self._psycopg.Error as exc:
            raise StoreError(f"{action} failed on {self.path}: {exc}", path=self.path) from exc

    def _read(self, action: str, fn: Callable[[Any], T]) -> T:
        with self._errors(action):
            return self._attempt(action, fn, transaction=False)

    def _write(self, action: str, fn: Callable[[Any], T]) -> T:
        """Run ``fn`` in one transaction. A transaction PostgreSQL aborted as a deadlock or a
        serialization failure (rolled back whole, so running ``fn`` again is safe) is retried
        after a random pause, up to ``WRITE_ATTEMPTS`` times in all."""
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                return self._attempt(action, fn, transaction=True)
            except self._psycopg.Error as exc:
                cause = _RETRYABLE.get(getattr(exc, "sqlstate", None) or "")
                if cause is None:
                    raise StoreError(
                        f"{action} failed on {self.path}: {exc}", path=self.path
                    ) from exc
                if attempt == WRITE_ATTEMPTS:
                    raise StoreError(
                        f"{action} failed on {self.path}: PostgreSQL aborted it as a {cause} "
                        f"{attempt} times in a row ({exc}); retry later, or run fewer "
                        "concurrent writers against this store",
                        path=self.path,
                    ) from exc
                self.retries += 1
                # Jitter: the aborted writers must not all come back at the same moment.
                time.sleep(random.uniform(0.0, min(0.5, 0.005 * 2**attempt)))
        raise AssertionError("unreachable")  # pragma: no cover

    # -- dialect hooks ------------------------------------------------------------

    def _ex(self, c: Any, sql: str, params: Any = ()) -> Any:
        return c.execute(_translate(sql), params)

    def _exm(self, c: Any, sql: str, rows: Any) -> Any:
        cursor = c.cursor()
        cursor.executemany(_translate(sql), rows)
        return cursor

    def _lock_node(self, c: Any, node_id: str) -> None:
        # The row may not exist yet, so lock its id: two claimers of one
        # missing EXTERNAL_EFFECT node are serialised, and only one executes.
        c.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (node_id,))

    # -- durable runs ---------------------------------------------------------------

    def commit_durable(self, fn: Callable[[Any], T], action: str = "durable commit") -> T:
        """Run ``fn`` in one transaction; PostgreSQL's commit is durable (WAL flushed) when it
        returns, as long as the server keeps its default ``synchronous_commit = on``."""
        return self._write(action, fn)

    def transaction(self, fn: Callable[[Any], T], action: str = "transaction") -> T:
        return self._write(action, fn)

    def query(self, fn: Callable[[Any], T], action: str = "query") -> T:
        return self._read(action, fn)

    def session_lock(self, purpose: str, name: str, *, run_id: str | None = None) -> PgSessionLock:
        """A lock on ``name`` (a run id, a node id) shared by every worker of this store,
        held on a connection of its own (see :mod:`._pglock`)."""
        return PgSessionLock(
            self.dsn, lock_key(self.schema, purpose, name), path=self.path, run_id=run_id,
            connect_timeout=self._timeout,
        )

    def flight_locks(self) -> PgFlightLocks:
        """The cross-process primitive of single flight (:mod:`musubi_core.flight`)."""
        return PgFlightLocks(self.dsn, self.schema, path=self.path, connect_timeout=self._timeout)

    # -- lifecycle ------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        try:
            # What the store's recorder still holds is committed first.
            self._run_close_hooks()
        finally:
            self._close_connections()

    def _close_connections(self) -> None:
        with self._pool_lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None and self._pool_pid == os.getpid():
            with contextlib.suppress(Exception):
                pool.close(timeout=5.0)

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PostgresStore({self.path!r})"
