"""The PostgreSQL store: one store shared by many workers on many machines.

Same schema, same statements and the same conformance suite as the SQLite
store; only connections, transactions and locking differ. Requires
``pip install "musubi-lineage[postgres]"`` (psycopg 3).

Durable runs (:func:`musubi_core.run`) stay on SQLite: their one-writer lock
is a file lock next to the store file.

>>> store = PostgresStore("postgresql://localhost/musubi")   # doctest: +SKIP
>>> Engine(store)                                             # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from ..errors import SchemaError, StoreError
from ._sqlbase import SQLStoreBase
from .schema import (
    APP_ID,
    DDL,
    SCHEMA_VERSION,
    check_version,
    migration_statements,
    stored_version,
)

__all__ = ["PostgresStore"]

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


class PostgresStore(SQLStoreBase):
    """musubi's store on PostgreSQL (psycopg 3).

    ``dsn`` is a libpq connection string or URL. ``schema`` keeps musubi's
    tables in their own PostgreSQL schema (created if missing), so one
    database can hold several stores. ``path`` (used in messages and by the
    CLI) is the DSN with its password hidden.
    """

    # CAST(x AS BIGINT) rounds here (SQLite's truncates): time buckets floor instead.
    _FLOOR = "FLOOR({})"

    def __init__(self, dsn: str, *, schema: str = "musubi", timeout: float = 60.0) -> None:
        try:
            import psycopg
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                'PostgresStore needs psycopg 3: pip install "musubi-lineage[postgres]"'
            ) from exc
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", schema):
            raise ValueError(f"schema must be a plain identifier, got {schema!r}")
        self._psycopg = psycopg
        self.dsn = dsn
        self.schema = schema
        self.path = f"{_redact(dsn)} (schema {schema})"
        self._timeout = timeout
        self._local = threading.local()
        self._all: list[Any] = []
        self._all_lock = threading.Lock()
        self._closed = False
        # Transactions retried after a deadlock or serialization failure (diagnostics).
        self.retries = 0
        self._initialise()

    # -- connections ----------------------------------------------------------------

    def _conn(self) -> Any:
        local = self._local
        conn = getattr(local, "conn", None)
        pid = os.getpid()
        if conn is not None and local.pid == pid and not conn.closed:
            return conn
        if self._closed:
            raise StoreError(f"store {self.path} is closed", path=self.path)
        if conn is not None and local.pid != pid:
            # Forked child: a libpq connection must not be shared with the parent.
            _ABANDONED.append(conn)
            with self._all_lock:
                self._all = []
        try:
            conn = self._psycopg.connect(self.dsn, connect_timeout=int(self._timeout))
            # Wait for row locks instead of failing, like SQLite's busy_timeout.
            conn.execute(f"SET lock_timeout = '{int(self._timeout * 1000)}ms'")
            conn.execute(f'SET search_path TO "{self.schema}"')
            conn.commit()
        except self._psycopg.Error as exc:
            raise StoreError(f"cannot connect to {self.path}: {exc}", path=self.path) from exc
        with self._all_lock:
            if self._closed:
                # close() ran while this thread connected: do not leave a connection open.
                with contextlib.suppress(Exception):
                    conn.close()
                raise StoreError(f"store {self.path} is closed", path=self.path)
            self._all.append(conn)
        local.conn, local.pid = conn, pid
        return conn

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
            conn = self._conn()
            try:
                return fn(conn)
            finally:
                # Reads run in their own short transaction, never left open.
                conn.rollback()

    def _write(self, action: str, fn: Callable[[Any], T]) -> T:
        """Run ``fn`` in one transaction. A transaction PostgreSQL aborted as a deadlock or a
        serialization failure (rolled back whole, so running ``fn`` again is safe) is retried
        after a random pause, up to ``WRITE_ATTEMPTS`` times in all."""
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            conn = self._conn()
            try:
                with conn.transaction():
                    return fn(conn)
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
        with self._all_lock:
            self._closed = True
            conns, self._all = self._all, []
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()
        self._local = threading.local()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PostgresStore({self.path!r})"
