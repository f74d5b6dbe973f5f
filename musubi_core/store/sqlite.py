"""The SQLite store: one local file, safe for many threads and processes.

>>> import tempfile, os
>>> with SQLiteStore(os.path.join(tempfile.mkdtemp(), "m.db")) as store:
...     store.stats()["nodes"]
0
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from ..errors import SchemaError, StoreError
from ._sqlbase import _LOOKUP, SQLStoreBase, _fast_node
from .base import NodeRecord
from .schema import (
    APP_ID,
    DDL,
    SCHEMA_VERSION,
    check_version,
    existing_tables,
    migration_statements,
    stored_version,
)
from .sqlite_runs import RunStoreMixin

__all__ = ["SQLiteStore"]

T = TypeVar("T")

# Inherited connections are parked here after a fork rather than closed:
# closing a connection the parent still uses could drop the parent's locks.
_ABANDONED: list[sqlite3.Connection] = []



class SQLiteStore(RunStoreMixin, SQLStoreBase):
    """musubi's default store: lineage, artifacts and runs in one SQLite file.

    ``timeout`` is how long a writer waits for another writer before giving
    up (it is SQLite's ``busy_timeout``): long enough that several processes
    writing at once queue up instead of failing with "database is locked".
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 60.0) -> None:
        raw = os.fspath(path)
        self._uri = False
        if raw == ":memory:":
            # A private in-memory store shared by this store's threads (a
            # plain ":memory:" would give every thread its own empty database).
            raw, self._uri = f"file:musubi-{uuid.uuid4().hex}?mode=memory&cache=shared", True
        elif raw.startswith("file:"):
            self._uri = True
        else:
            # Absolute: a later os.chdir() must not point the store elsewhere.
            raw = os.path.abspath(raw)
        self.path = raw
        self._ready = False
        if not self._uri:
            parent = os.path.dirname(self.path)
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create folder for {self.path}: {exc}", path=self.path) from exc
        self._timeout = timeout
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._closed = False
        self._file_id: tuple[int, int] | None = None
        self._initialise()
        self._file_id = self._current_file_id()

    # -- connections ------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path,
                uri=self._uri,
                timeout=self._timeout,
                isolation_level=None,  # we issue BEGIN IMMEDIATE ourselves
                check_same_thread=False,  # close() may run on another thread
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path}: {exc}", path=self.path) from exc
        # Wait for a busy writer instead of failing at once ("database is locked").
        conn.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
        # Temp b-trees of the invalidation CTE stay in memory.
        conn.execute("PRAGMA temp_store = MEMORY")
        # Lookups in a large store: a bigger page cache than SQLite's 2 MB
        # default, and memory-mapped reads (no read() call per page), keep a
        # probe of a 1M-node store close to one of a 1k-node store. Both are
        # per connection and change nothing in the file; memory is used only
        # as pages are actually read.
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA cache_size = -32000")
            conn.execute("PRAGMA mmap_size = 268435456")
        if self._ready:
            self._tune(conn)
        return conn

    def _tune(self, conn: sqlite3.Connection) -> None:
        """File-level settings, applied only once the file is known to be a
        musubi store (a foreign file is rejected untouched)."""
        with contextlib.suppress(sqlite3.Error):
            # WAL: readers never block the writer, so `musubi stats` or a plain
            # `sqlite3` shell can inspect a store while a pipeline writes to it.
            conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode: a commit survives a process crash (kill -9);
            # only an OS crash or power loss may drop the last commits, which
            # for a cache costs a recomputation. Durable run checkpoints
            # switch to FULL for their commit (see commit_durable).
            conn.execute("PRAGMA synchronous = NORMAL")

    def tune_for_writing(self) -> None:
        """This thread's connection only writes batches (the recorder's thread): SQLite's
        default 2 MB page cache instead of the lookup connections' 32 MB, and no memory map.
        A batch appends calls and touches few pages; a big cache or a map there would only
        grow the process's resident memory with the file (up to 32 MB of cache, and every
        mapped page a write walks) without making anything faster."""
        with contextlib.suppress(sqlite3.Error):
            conn = self._conn()
            conn.execute("PRAGMA cache_size = -2000")
            conn.execute("PRAGMA mmap_size = 0")

    def _conn(self) -> sqlite3.Connection:
        local = self._local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        pid = os.getpid()
        if conn is not None and local.pid == pid:
            return conn
        if self._closed:
            raise StoreError(f"store {self.path} is closed", path=self.path)
        if conn is not None:
            # Forked child: never reuse the parent's connection (SQLite forbids
            # it) and never close it (that could release the parent's locks).
            _ABANDONED.append(conn)
            with self._all_lock:
                self._all = []
        conn = self._connect()
        local.conn = conn
        local.pid = pid
        with self._all_lock:
            self._all.append(conn)
        return conn

    def _initialise(self) -> None:
        conn = self._conn()
        try:
            tables = existing_tables(conn)
            if check_version(conn, self.path, tables):
                self._ready = True
                self._tune(conn)
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Re-check inside the write lock: another process may have
                # created (or claimed) the file since we looked.
                tables = existing_tables(conn)
                if not check_version(conn, self.path, tables):
                    found = stored_version(conn, tables)
                    # Statement by statement: executescript() would COMMIT first. An older
                    # file is migrated in this same transaction: all of it or nothing.
                    for statement in migration_statements(found) if found else ():
                        conn.execute(statement)
                    for statement in DDL.split(";\n"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.executemany(
                        "INSERT OR IGNORE INTO musubi_meta (key, value) VALUES (?, ?)",
                        [
                            ("app", APP_ID),
                            ("hash_scheme", "musubi/1"),
                            ("created_at", repr(time.time())),
                        ],
                    )
                    conn.execute(
                        "INSERT INTO musubi_meta (key, value) VALUES ('schema_version', ?) "
                        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        (str(SCHEMA_VERSION),),
                    )
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            self._ready = True
            self._tune(conn)
        except SchemaError:
            self.close()
            raise
        except sqlite3.DatabaseError as exc:
            self.close()
            message = str(exc)
            if "not a database" in message or "encrypted" in message:
                raise SchemaError(
                    f"{self.path} is not a SQLite database (or is encrypted); "
                    "point musubi at a new file with MUSUBI_DB or --db",
                    path=self.path,
                    expected="SQLite database",
                    found="unknown file",
                ) from exc
            if "malformed" in message or "corrupt" in message:
                raise StoreError(
                    f"{self.path} is damaged ({message}); run `musubi --db {self.path} check`, "
                    "restore a backup, or move the file away to start fresh",
                    path=self.path,
                ) from exc
            raise StoreError(f"cannot open {self.path}: {message}", path=self.path) from exc

    def _current_file_id(self) -> tuple[int, int] | None:
        if self.path == ":memory:" or self.path.startswith("file:"):
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def _check_file(self) -> None:
        """SQLite keeps writing to a file that was deleted or replaced under an
        open connection, silently losing every later write: refuse instead."""
        if self._file_id is None:
            return
        current = self._current_file_id()
        if current != self._file_id:
            what = "deleted" if current is None else "replaced by another file"
            raise StoreError(
                f"{self.path} was {what} while in use; later results would be lost. "
                "Open the store again (restart the program) to start a new file",
                path=self.path,
            )

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            message = str(exc)
            hint = ""
            if "readonly" in message:
                hint = "; the file or its folder is read-only"
            elif "locked" in message or "busy" in message:
                hint = f"; another process held the write lock for over {self._timeout:.0f}s"
            elif "malformed" in message or "not a database" in message:
                hint = f"; run `musubi --db {self.path} check`"
            elif "no such table" in message:
                hint = "; the file was replaced or deleted while in use"
            raise StoreError(f"{action} failed on {self.path}: {message}{hint}", path=self.path) from exc

    def _read(self, action: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._errors(action):
            return fn(self._conn())

    def _write(self, action: str, fn: Callable[[sqlite3.Connection], T], *, durable: bool = False) -> T:
        self._check_file()
        with self._errors(action):
            conn = self._conn()
            if durable:
                # FULL: the commit is on disk before we return, so it survives
                # power loss, not just a process crash.
                conn.execute("PRAGMA synchronous = FULL")
            try:
                # IMMEDIATE takes the write lock up front; a deferred
                # transaction that upgrades later can fail with SQLITE_BUSY
                # without consulting busy_timeout.
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    raise
            finally:
                if durable:
                    conn.execute("PRAGMA synchronous = NORMAL")
            return result

    # -- dialect hooks ------------------------------------------------------------

    def _changes(self, c: Any, cursor: Any) -> int:
        # sqlite3 leaves rowcount at -1 for a WITH ... UPDATE; changes() is exact.
        return int(c.execute("SELECT changes()").fetchone()[0])

    def _integrity_problems(self, c: Any) -> list[str]:
        return [r[0] for r in c.execute("PRAGMA integrity_check").fetchall() if r[0] != "ok"]

    def get_node_and_artifact(
        self, node_id: str
    ) -> tuple[NodeRecord, str | None, bytes | None] | None:
        # The replay hot path: one statement (cached by sqlite3), no closure or
        # context manager unless an error has to be translated.
        try:
            row = self._conn().execute(_LOOKUP, (node_id,)).fetchone()
        except sqlite3.Error as exc:
            with self._errors("lookup"):
                raise exc
        if row is None:
            return None
        return _fast_node(row), row[25], row[26]

    # -- durable runs -------------------------------------------------------------

    def commit_durable(
        self, fn: Callable[[sqlite3.Connection], T], action: str = "durable commit"
    ) -> T:
        """Run ``fn`` in one ``BEGIN IMMEDIATE`` transaction committed with
        ``synchronous=FULL`` (used by durable-run checkpoints)."""
        return self._write(action, fn, durable=True)

    def transaction(self, fn: Callable[[sqlite3.Connection], T], action: str = "transaction") -> T:
        """Run ``fn`` in one ``BEGIN IMMEDIATE`` transaction (normal durability)."""
        return self._write(action, fn)

    def query(self, fn: Callable[[sqlite3.Connection], T], action: str = "query") -> T:
        """Run read-only ``fn`` on this thread's connection."""
        return self._read(action, fn)

    # -- lifecycle ----------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        try:
            # What the store's recorder still holds is committed first.
            self._run_close_hooks()
        finally:
            self._close_connections()

    def _close_connections(self) -> None:
        self._closed = True
        with self._all_lock:
            conns, self._all = self._all, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"
