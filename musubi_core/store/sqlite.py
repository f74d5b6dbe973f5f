"""The SQLite store: one local file, safe for many threads and processes.

>>> import tempfile, os
>>> with SQLiteStore(os.path.join(tempfile.mkdtemp(), "m.db")) as store:
...     store.stats()["nodes"]
0
"""

from __future__ import annotations

import array
import atexit
import contextlib
import os
import sqlite3
import stat
import sys
import tempfile
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import quote

from .._pid import PID as _PID
from .._size import format_size, parse_size
from ..errors import ConfigError, MusubiError, ReadOnlyStoreError, SchemaError, StoreError
from ..flight import FileFlightLocks
from ._sqlbase import _COLUMN_TYPES, _LOOKUP, NODE_COLUMNS, NODE_EXPRS, SQLStoreBase, _row_to_node
from .base import NodeRecord
from .schema import (
    APP_ID,
    DDL,
    OPTIONAL_TABLES,
    SCHEMA_VERSION,
    check_version,
    existing_tables,
    migration_statements,
    readable_as_is,
    shadow_tables,
    stored_version,
)
from .sqlite_runs import RunStoreMixin

__all__ = ["SQLiteStore"]

T = TypeVar("T")

# Inherited connections are parked here after a fork rather than closed:
# closing a connection the parent still uses could drop the parent's locks.
_ABANDONED: list[sqlite3.Connection] = []

# A node row holding a value of a type musubi never writes in that column: _COLUMN_TYPES in
# SQLite's words, over NODE_EXPRS (the producer is the artifact's, read by a subquery).
_TYPEOF = {str: "text", float: "real", int: "integer", type(None): "null"}
_GARBLED = " OR ".join(
    f"typeof({expr}) NOT IN ({', '.join(repr(_TYPEOF[t]) for t in types)})"
    for expr, kinds in zip(
        NODE_EXPRS, _COLUMN_TYPES, strict=True
    )
    for types in [kinds if isinstance(kinds, tuple) else (kinds,)]
)

# Stores of this process with a file of their own, checkpointed when the interpreter exits.
_OPEN: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()

# Held by a background checkpoint while it is inside SQLite, and taken around a fork: a child
# must not inherit SQLite's internal mutexes locked by a thread it does not have (its first
# connect would wait forever). The recorder's commits are covered the same way (recorder.py).
_BACKGROUND = threading.Lock()

os.register_at_fork(
    before=_BACKGROUND.acquire,
    after_in_parent=_BACKGROUND.release,
    after_in_child=_BACKGROUND.release,
)


def _file_uri(path: str, **params: str) -> str:
    """A ``file:`` URI for ``path`` (quoted: any character a path may hold) with ``params``."""
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"file:{quote(path)}" + (f"?{query}" if query else "")


def _writable(path: str) -> bool:
    """Can this process write the store at ``path``? SQLite writes the file itself and
    creates its ``-wal`` and ``-shm`` (or a ``-journal``) next to it, so the folder must be
    writable too, unless those files already exist and are writable. ``os.access`` answers
    for this process: file modes, an immutable attribute (even for root) and read-only mounts."""
    if not os.path.exists(path):
        return True  # created on open; a failure to create it says why
    if not os.access(path, os.W_OK):
        return False
    if os.access(os.path.dirname(path) or ".", os.W_OK | os.X_OK):
        return True
    return all(os.access(path + suffix, os.W_OK) for suffix in ("-wal", "-shm"))


def _unchangeable(path: str) -> bool:
    """May a read-only connection treat the file as immutable (SQLite's ``immutable=1``: no
    locks, no ``-shm``, no look at the ``-wal``)? Only when no process can change it while
    we read: its file system is mounted read-only, or its folder is immutable (``chattr +i``)
    or has no write permission for anyone, so no writer can create the ``-wal`` it would
    need (only root ignores permissions). Never when a ``-wal`` holds commits: an immutable
    reader would not see them."""
    wal = path + "-wal"
    folder = os.path.dirname(path) or "."
    try:
        if os.path.exists(wal) and os.path.getsize(wal) > 0:
            return False
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return True
        mode = os.stat(folder).st_mode
    except OSError:
        return False
    return not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) or _immutable_attr(folder)


def _immutable_attr(path: str) -> bool:
    """Does ``path`` carry Linux's immutable attribute (``chattr +i``)? False where that
    cannot be read (another OS or file system)."""
    if not sys.platform.startswith("linux"):
        return False
    import fcntl

    flags = array.array("l", [0])
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, 0x80086601, flags, True)  # FS_IOC_GETFLAGS
        finally:
            os.close(fd)
    except OSError:
        return False
    return bool(flags[0] & 0x10)  # FS_IMMUTABLE_FL



class SQLiteStore(RunStoreMixin, SQLStoreBase):
    """musubi's default store: lineage, artifacts and runs in one SQLite file.

    ``timeout`` is how long a writer waits for another writer before giving
    up (it is SQLite's ``busy_timeout``): long enough that several processes
    writing at once queue up instead of failing with "database is locked".

    A store this process cannot write (a read-only file, folder or mount) is
    opened read-only (``read_only`` is then true; pass ``read_only=True`` to
    choose it): every read works, every write raises
    :class:`~musubi_core.errors.ReadOnlyStoreError`, and an
    :class:`~musubi_core.engine.Engine` on it replays but skips its writes
    (with one warning).

    ``size_limit`` (bytes, or a string such as ``"500MB"``; decimal units) bounds what the
    store takes: after commits (every :attr:`SIZE_CHECK_EVERY` at most, sooner as the store
    nears its limit; never on a lookup) the store measures itself and, once over the limit,
    evicts the least recently used replayable entries down to :attr:`SIZE_LOW_WATER` of it
    (see :meth:`gc`: never a checkpoint of an unfinished durable run, an external effect's
    record or a pending node), then hands the freed pages back to the file system.
    """

    # The size limit is checked after at most this many commits ...
    SIZE_CHECK_EVERY = 64
    # ... and, once exceeded, entries are evicted until the store takes this share of it, so
    # that the next commits do not evict again at once.
    SIZE_LOW_WATER = 0.9
    # A store that could not be brought under its limit (what is left cannot be evicted) is
    # tried again only after it grew by this factor.
    SIZE_REGROW = 1.05

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = 60.0,
        read_only: bool | None = None,
        size_limit: int | str | None = None,
    ) -> None:
        raw = os.fspath(path)
        try:
            self.size_limit = None if size_limit is None else parse_size(size_limit)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"size_limit: {err}", target=raw) from None
        self._size_lock = threading.Lock()
        self._size_pid = os.getpid()
        self._commits = 0
        self._next_check = 1  # the first commit measures the store
        self._checked_at = (0, 0)  # (commits, bytes in use) at the last check
        self._growth = 0.0  # bytes per commit, as last measured
        self._unevictable = 0  # bytes left after an eviction that could not meet the limit
        self._warned_size = False
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
        # CREATE TEMP TABLE statements each connection runs (see _initialise: the optional
        # tables a read-only file lacks).
        self._shadow: list[str] = []
        if read_only is None:
            read_only = "mode=ro" in raw if self._uri else not _writable(raw)
        self.read_only = read_only
        # What sqlite3.connect opens: the path, or a read-only URI for it.
        self._target = _file_uri(raw, mode="ro") if read_only and not self._uri else raw
        if not self._uri and not read_only:
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
        self._checkpointer: tuple[int, threading.Thread] | None = None
        self._checkpoint_wake = threading.Event()
        self._file_id: tuple[int, int] | None = None
        self._initialise()
        self._file_id = self._current_file_id()
        if not self._uri and not read_only:
            _OPEN.add(self)

    # -- connections ------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self._target,
                uri=self._uri or self._target != self.path,
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
        if self._ready and not self.read_only:
            self._tune(conn)
        for statement in self._shadow:
            conn.execute(statement)
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
            # Its commits never run a checkpoint: SQLite's automatic one (every 1000 pages)
            # makes the committing connection copy the WAL into the main file and fsync it,
            # seconds on a busy disk, while rows wait. after_batch() has another thread do it.
            conn.execute("PRAGMA wal_autocheckpoint = 0")

    # A batch writer's WAL is checkpointed by a background thread once it holds this much.
    def writer_process_spec(self) -> dict[str, Any] | None:
        """How the recorder's helper process opens this store to commit batches (see
        :mod:`musubi_core.record.writer_process`); None when only this process can write it
        (an in-memory or URI store, a read-only file). The helper enforces no size limit:
        :meth:`written_elsewhere` counts its commits here, where the limit is kept."""
        if self._uri or self.read_only or self._closed:
            return None
        return {"path": self.path, "timeout": self._timeout}

    def written_elsewhere(self) -> None:
        """The recorder's helper committed a batch to this file: count it towards the next
        size check, as a commit of this process would count."""
        self._count_commit()

    def _count_commit(self) -> None:
        if self.size_limit is not None:
            self._commits += 1
            if self._commits >= self._next_check:
                self._enforce_quietly()

    CHECKPOINT_WAL_BYTES = 4 * 1024 * 1024

    def after_batch(self) -> None:
        """Called by the recorder after each batch it commits: once the WAL has grown past
        :attr:`CHECKPOINT_WAL_BYTES`, a background thread checkpoints it (PASSIVE: it never
        blocks a writer or a reader), so the batch writer itself never waits for one."""
        if self._uri or self.read_only:
            return
        try:
            size = os.stat(self.path + "-wal").st_size
        except OSError:
            return
        if size < self.CHECKPOINT_WAL_BYTES:
            return
        with self._all_lock:
            if self._closed:
                return
            pid = os.getpid()
            checkpointer = self._checkpointer
            if checkpointer is None or checkpointer[0] != pid or not checkpointer[1].is_alive():
                # One long-lived thread per store, not one per checkpoint: every new thread
                # may get a malloc arena of its own, which the process never gives back.
                thread = threading.Thread(
                    target=self._checkpoint_loop, name="musubi-checkpoint", daemon=True
                )
                try:
                    thread.start()
                except RuntimeError:  # interpreter shutting down
                    return
                self._checkpointer = (pid, thread)
        self._checkpoint_wake.set()

    def _checkpoint_loop(self) -> None:
        wake = self._checkpoint_wake
        while not self._closed:
            if not wake.wait(60.0):
                continue
            wake.clear()
            if self._closed:
                return
            with _BACKGROUND, contextlib.suppress(sqlite3.Error):
                conn = sqlite3.connect(_file_uri(self.path, mode="rw"), uri=True, timeout=0)
                try:
                    # A checkpoint copies WAL frames into the file: no page cache to speak of.
                    conn.execute("PRAGMA cache_size = -256")
                    # PASSIVE: copies what it can without waiting for anyone.
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                finally:
                    conn.close()

    def _conn(self) -> sqlite3.Connection:
        local = self._local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        pid = _PID[0]  # every lookup asks for its connection: no system call here
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
        with self._all_lock:
            if self._closed:
                # close() ran while this thread connected: a connection it never saw would
                # keep the file (and its -wal) open after the store said it was closed.
                conn.close()
                raise StoreError(f"store {self.path} is closed", path=self.path)
            self._all.append(conn)
        local.conn = conn
        local.pid = pid
        return conn

    def _initialise(self) -> None:
        try:
            conn, tables = self._first_read()
            if check_version(conn, self.path, tables):
                self._ready = True
                if not self.read_only:
                    self._tune(conn)
                return
            if self.read_only:
                if readable_as_is(conn, tables):
                    # A current file made before the optional tables existed: read it as it
                    # is, each connection seeing empty temporary tables in their place
                    # (lookups then go without aliases).
                    self._shadow = shadow_tables(OPTIONAL_TABLES - tables)
                    for statement in self._shadow:
                        conn.execute(statement)
                    self.has_aliases = "musubi_aliases" in tables
                    self._ready = True
                    return
                raise ReadOnlyStoreError(
                    self.path,
                    action="create the store"
                    if not tables
                    else "bring the store up to this version's schema",
                )
            if not tables:
                # A new file hands the pages gc frees back to the file system (PRAGMA
                # incremental_vacuum, see _after_gc). SQLite takes this only before the first
                # table exists; an older file is converted by `musubi gc --vacuum`.
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
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
        except (SchemaError, ReadOnlyStoreError):
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

    def _first_read(self) -> tuple[sqlite3.Connection, set[str]]:
        """This thread's connection and the store's tables. The first read is where a
        read-only WAL file whose ``-shm`` cannot be created fails to open; such a file is
        opened as immutable when nothing can change it (see ``_unchangeable``), and is
        otherwise refused (it cannot be read safely)."""
        conn = self._conn()
        try:
            return conn, existing_tables(conn)
        except sqlite3.OperationalError as exc:
            if not (self.read_only and "unable to open" in str(exc)) or self._uri:
                raise
            if not _unchangeable(self.path):
                raise ReadOnlyStoreError(
                    self.path,
                    action="open it: SQLite needs to create its -shm file next to it",
                    hint="make the folder writable for this user, or read a copy "
                    "(`musubi --db PATH backup COPY` where the store is writable)",
                ) from exc
        # Swap this thread's connection for an immutable one (nothing else uses it yet).
        self._target = _file_uri(self.path, mode="ro", immutable="1")
        self.close()
        self._closed = False
        conn = self._conn()
        return conn, existing_tables(conn)

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
                # Writable when opened; read-only since (a remount, a chmod).
                raise ReadOnlyStoreError(self.path, action=action) from exc
            if "locked" in message or "busy" in message:
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
        if self.read_only:
            raise ReadOnlyStoreError(self.path, action=action)
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
        self._count_commit()
        return result

    # -- dialect hooks ------------------------------------------------------------

    def _changes(self, c: Any, cursor: Any) -> int:
        # sqlite3 leaves rowcount at -1 for a WITH ... UPDATE; changes() is exact.
        return int(c.execute("SELECT changes()").fetchone()[0])

    def _integrity_problems(self, c: Any) -> list[str]:
        return [r[0] for r in c.execute("PRAGMA integrity_check").fetchall() if r[0] != "ok"]

    def _garbled_rows(self, c: Any, limit: int) -> list[Any]:
        # SQLite stores any value in any column (a REAL column keeps 'garbage' as text).
        rows: list[Any] = c.execute(
            f"SELECT {NODE_COLUMNS} FROM musubi_nodes n WHERE {_GARBLED} LIMIT ?", (limit,)
        ).fetchall()
        return rows

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
        return _row_to_node(row, self.path), row[26], row[27]

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

    # -- size ---------------------------------------------------------------------

    def _used_bytes(self, c: Any) -> int | None:
        # As SQLite counts it, inside the current transaction: the pages in use (free pages
        # inside the file are reused before the file grows).
        pages = c.execute("PRAGMA page_count").fetchone()[0]
        free = c.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * c.execute("PRAGMA page_size").fetchone()[0])

    def _file_bytes(self) -> int | None:
        if self._uri:
            return None
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.path.getsize(self.path + suffix)
        return total

    def _size_info(self, c: Any) -> dict[str, Any] | None:
        page = int(c.execute("PRAGMA page_size").fetchone()[0])
        pages = int(c.execute("PRAGMA page_count").fetchone()[0])
        free = int(c.execute("PRAGMA freelist_count").fetchone()[0])
        return {
            "used_bytes": (pages - free) * page,
            "free_bytes": free * page,
            "file_bytes": self._file_bytes(),
            "incremental_vacuum": int(c.execute("PRAGMA auto_vacuum").fetchone()[0]) == 2,
            "size_limit": self.size_limit,
        }

    def _can_vacuum(self) -> bool:
        return True

    def _after_gc(self, *, removed: bool, vacuum: bool) -> None:
        """Hand the pages gc freed back to the file system. A file created with
        ``auto_vacuum = INCREMENTAL`` (every store this version creates) does it in place
        (``PRAGMA incremental_vacuum``: it moves the last pages into the free ones and cuts
        the file); an older file shrinks only with ``vacuum`` (``VACUUM``, which also converts
        it). Then a checkpoint copies the result into the main file and empties the -wal."""
        if vacuum:
            self.vacuum()
            return
        if not removed:
            return
        with self._errors("incremental vacuum"):
            conn = self._conn()
            if int(conn.execute("PRAGMA auto_vacuum").fetchone()[0]) == 2:
                # executescript steps the pragma to completion (execute() frees one page).
                conn.executescript("PRAGMA incremental_vacuum")
        self.checkpoint()

    def vacuum(self) -> dict[str, Any]:
        """Rewrite the file without its free pages (SQLite's ``VACUUM``), converting an older
        file to ``auto_vacuum = INCREMENTAL`` so that later gcs shrink it in place. It takes
        the write lock for as long as it runs (writers of other processes wait, readers do
        not) and needs free disk space about the size of the store, for the copy it builds.
        Returns the file's size before and after."""
        if self.read_only:
            raise ReadOnlyStoreError(self.path, action="vacuum")
        self._check_file()
        before = self._file_bytes()
        with self._errors("vacuum"):
            conn = self._conn()
            # The copy VACUUM builds goes to a temporary file, not memory (temp_store = MEMORY
            # suits the small temporary tables of lookups, not a copy of the whole store).
            conn.execute("PRAGMA temp_store = DEFAULT")
            try:
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
                conn.execute("VACUUM")
            finally:
                conn.execute("PRAGMA temp_store = MEMORY")
        self.checkpoint()
        return {"file_bytes_before": before, "file_bytes_after": self._file_bytes()}

    def enforce_size_limit(self) -> dict[str, Any] | None:
        """Measure the store now and, when it takes more than :attr:`size_limit`, evict down
        to :attr:`SIZE_LOW_WATER` of it. Returns the gc report, or None when nothing was done
        (no limit, under it, read-only, or another thread is enforcing it). Called by the
        store itself after commits and when it closes."""
        if self.size_limit is None or self.read_only or self._closed:
            return None
        if self._size_pid != os.getpid():
            # A forked child: the parent's lock may have been held by a thread it has not.
            self._size_lock, self._size_pid = threading.Lock(), os.getpid()
        if not self._size_lock.acquire(blocking=False):
            return None  # another thread is at it (or this one, from inside its gc)
        try:
            return self._enforce(self.size_limit)
        finally:
            self._size_lock.release()

    def _enforce(self, limit: int) -> dict[str, Any] | None:
        used = self._read_used_bytes() or 0
        commits, last_used = self._checked_at
        if self._commits > commits and used > last_used:
            # How fast the store grows per commit (kept across an eviction).
            self._growth = (used - last_used) / (self._commits - commits)
        report = None
        if used > limit and used > self._unevictable * self.SIZE_REGROW:
            report = self._gc(
                older_than=None, now=None, records_older_than=None, max_bytes=limit,
                target=int(limit * self.SIZE_LOW_WATER), dry_run=False, ids=False, vacuum=False,
            )
            used = int(report["bytes_after"] or 0)
            self._unevictable = used if report["over_limit"] else 0
            if report["over_limit"] and not self._warned_size:
                self._warned_size = True
                warnings.warn(
                    f"musubi: {self.path} takes {format_size(used)}, over its size_limit of "
                    f"{format_size(limit)}, and nothing more can be evicted: what is left are "
                    "unfinished durable runs, external effects' records and pending entries. "
                    "Finish (or re-run) those durable runs, or raise size_limit",
                    RuntimeWarning,
                    stacklevel=2,
                )
        # The next check: sooner as the store nears its limit, judged by how fast it has been
        # growing; never later than SIZE_CHECK_EVERY commits.
        per_commit = max(self._growth, 1.0)
        room = limit - used
        every = self.SIZE_CHECK_EVERY
        wait = every if room <= 0 else max(1, min(every, int(room / per_commit / 2)))
        self._checked_at = (self._commits, used)
        self._next_check = self._commits + wait
        return report

    def _enforce_quietly(self) -> None:
        """Enforce the size limit after a commit: a failure there must not look like a failure
        of the write that just committed, so it is a warning."""
        try:
            self.enforce_size_limit()
        except (MusubiError, sqlite3.Error) as exc:
            self._next_check = self._commits + self.SIZE_CHECK_EVERY
            warnings.warn(
                f"musubi: enforcing the size limit of {self.path} failed ({exc}); it is tried "
                "again later",
                RuntimeWarning,
                stacklevel=3,
            )

    # -- copies -------------------------------------------------------------------

    def backup(self, dest: str | os.PathLike[str], *, force: bool = False) -> dict[str, Any]:
        """Copy the store to the new SQLite file ``dest`` with SQLite's online backup API:
        one consistent snapshot, taken while other processes keep writing (they are not
        blocked). ``dest`` must not exist unless ``force``; it appears complete or not at
        all (the copy is written beside it, then renamed over it). Returns its path, size
        and node count."""
        target = os.path.abspath(os.fspath(dest))
        if os.path.isdir(target):
            raise StoreError(
                f"{target} is a folder; give the backup a file name, e.g. "
                f"{os.path.join(target, 'musubi-backup.db')}",
                path=target,
            )
        if os.path.exists(target):
            if self._file_id is not None and os.path.samefile(target, self.path):
                raise StoreError(f"{target} is the store itself; back it up elsewhere", path=target)
            if not force:
                raise StoreError(
                    f"{target} already exists; choose a new file, or pass --force "
                    "(force=True) to replace it",
                    path=target,
                )
        folder = os.path.dirname(target)
        try:
            os.makedirs(folder, exist_ok=True)
            fd, partial = tempfile.mkstemp(prefix=".musubi-backup-", suffix=".db", dir=folder)
            os.close(fd)
        except OSError as exc:
            raise StoreError(f"cannot write a backup in {folder}: {exc}", path=target) from exc
        try:
            with self._errors("backup"), contextlib.closing(sqlite3.connect(partial)) as out:
                # pages=-1: every page in one step, under one read transaction of the store,
                # so the copy is one snapshot even while other processes write.
                self._conn().backup(out, pages=-1)
                # A backup is one self-contained file: rollback-journal mode needs no -wal or
                # -shm, so it opens even from read-only media (musubi switches a writable
                # store back to WAL when it opens it).
                out.execute("PRAGMA journal_mode = DELETE")
                nodes = int(out.execute("SELECT COUNT(*) FROM musubi_nodes").fetchone()[0])
            os.replace(partial, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(partial)
            raise
        return {"path": target, "bytes": os.path.getsize(target), "nodes": nodes}

    # -- lifecycle ----------------------------------------------------------------

    def flight_locks(self) -> FileFlightLocks:
        """The cross-process primitive of single flight (:mod:`musubi_core.flight`): record
        locks on the sidecar file ``<store>.flights``."""
        return FileFlightLocks(f"{self.path}.flights")

    def checkpoint(self) -> None:
        """Copy every commit from the ``-wal`` into the main file and empty the ``-wal``, so
        that the main file alone holds the whole store (a copy of it is complete). Best
        effort: never raises and never waits for another process (what a busy store cannot
        checkpoint now stays in the ``-wal``, which is just as safe)."""
        if self._uri or self.read_only or self._current_file_id() != self._file_id:
            return  # in memory, not ours to write, or no longer the file we opened
        with contextlib.suppress(sqlite3.Error):
            # mode=rw: never create the file if it was deleted meanwhile.
            conn = sqlite3.connect(_file_uri(self.path, mode="rw"), uri=True, timeout=0)
            try:
                # No waiting: a checkpoint that would block on another process's reader
                # or writer copies what it can and leaves the rest (PASSIVE behaviour).
                conn.execute("PRAGMA busy_timeout = 0")
                # TRUNCATE: copy the WAL into the main file, then cut the WAL to zero bytes.
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()

    def close(self) -> None:
        if self._closed:
            return
        try:
            # What the store's recorder still holds is committed first.
            self._run_close_hooks()
            if self.size_limit is not None and self._commits > self._checked_at[0]:
                # What was written since the last check is measured too: a closed store is
                # within its limit.
                self._enforce_quietly()
        finally:
            self._close_connections()

    def _close_connections(self) -> None:
        already = self._closed
        with self._all_lock:
            self._closed = True
            conns, self._all = self._all, []
        self._checkpoint_wake.set()  # its thread sees the store closed and ends
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()
        _OPEN.discard(self)
        if not already:
            # A clean close leaves the main file complete: SQLite checkpoints by itself only
            # when the last connection of ALL processes closes, so while any other process
            # (a notebook, a `musubi` command, a server) keeps the store open, the commits
            # would stay in the -wal and a copy of the main file would miss them.
            self.checkpoint()

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"


@atexit.register
def _checkpoint_at_exit() -> None:
    """A program that never closed its store (the default engine of ``@step``) still
    leaves a complete main file when it exits normally (registered before the engine's
    exit hook, so it runs after the engine flushed its buffered writes)."""
    for store in list(_OPEN):
        store.checkpoint()
