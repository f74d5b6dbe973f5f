"""The SQLite store: one local file, safe for many threads and processes.

>>> import tempfile, os
>>> with SQLiteStore(os.path.join(tempfile.mkdtemp(), "m.db")) as store:
...     store.stats()["nodes"]
0
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from ..errors import NodeNotFoundError, SchemaError, StoreError
from .base import (
    ArtifactWrite,
    ClaimOutcome,
    EdgeRecord,
    EdgeWrite,
    NodeRecord,
    NodeWrite,
    ParentState,
)
from .schema import APP_ID, DDL, SCHEMA_VERSION, check_version, existing_tables
from .sqlite_runs import RunStoreMixin

__all__ = ["SQLiteStore"]

T = TypeVar("T")

NODE_COLUMNS = (
    "node_id, op, op_name, kind, step_type, input_hash, status, artifact_id, "
    "(SELECT producer_node_id FROM musubi_artifacts a WHERE a.artifact_id = n.artifact_id), "
    "namespace, created_at, started_at, finished_at, expires_at, duration_s, tokens_in, "
    "tokens_out, replay_count, exec_count, error, owner, label, run_id, stale_cause, meta"
)

_UPSERT_NODE = """
INSERT INTO musubi_nodes (
    node_id, op, op_name, kind, step_type, input_hash, status, artifact_id, namespace,
    created_at, started_at, finished_at, expires_at, duration_s, tokens_in, tokens_out,
    exec_count, error, owner, label, run_id, meta
) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (node_id) DO UPDATE SET
    status = excluded.status,
    artifact_id = COALESCE(excluded.artifact_id, musubi_nodes.artifact_id),
    step_type = excluded.step_type,
    started_at = excluded.started_at,
    finished_at = excluded.finished_at,
    expires_at = excluded.expires_at,
    duration_s = COALESCE(excluded.duration_s, musubi_nodes.duration_s),
    tokens_in = COALESCE(excluded.tokens_in, musubi_nodes.tokens_in),
    tokens_out = COALESCE(excluded.tokens_out, musubi_nodes.tokens_out),
    exec_count = musubi_nodes.exec_count + excluded.exec_count,
    error = excluded.error,
    owner = excluded.owner,
    label = COALESCE(excluded.label, musubi_nodes.label),
    run_id = COALESCE(excluded.run_id, musubi_nodes.run_id),
    meta = COALESCE(excluded.meta, musubi_nodes.meta),
    stale_cause = NULL
"""

_INSERT_ARTIFACT = """
INSERT INTO musubi_artifacts (artifact_id, encoding, payload, size, producer_node_id, created_at)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (artifact_id) DO UPDATE SET
    encoding = excluded.encoding,
    payload = excluded.payload,
    size = excluded.size
-- Content-addressed: an id has one right payload. Rewriting it only when it
-- differs repairs a damaged or tampered copy (a recomputation heals the store)
-- and keeps the first producer.
WHERE musubi_artifacts.payload IS NOT excluded.payload
   OR musubi_artifacts.encoding IS NOT excluded.encoding
"""

_UPSERT_EDGE = """
INSERT INTO musubi_edges (parent, child, kind, parent_artifact_id) VALUES (?, ?, ?, ?)
ON CONFLICT (parent, kind, child) DO UPDATE SET
    parent_artifact_id = COALESCE(excluded.parent_artifact_id, musubi_edges.parent_artifact_id)
"""

# One pass over the data-descendants. UNION (not UNION ALL) makes SQLite keep
# a visited set, so each node is expanded once: 50 stacked diamonds stay
# linear instead of 2**50 paths.
_INVALIDATE = """
WITH RECURSIVE down(id) AS (
    SELECT :root
    UNION
    SELECT e.child FROM musubi_edges e JOIN down d ON e.parent = d.id WHERE e.kind = 'data'
)
UPDATE musubi_nodes
SET status = 'stale',
    stale_cause = CASE WHEN node_id = :root THEN 'invalidated' ELSE 'upstream' END
WHERE node_id IN (SELECT id FROM down)
  AND (status != 'stale' OR node_id = :root)
"""

# After a node's output changed: its data-descendants (not the node itself,
# which was just recomputed) go stale; early cutoff then sees the new artifact.
_STALE_DESCENDANTS = """
WITH RECURSIVE down(id) AS (
    SELECT e.child FROM musubi_edges e WHERE e.parent = :root AND e.kind = 'data'
    UNION
    SELECT e.child FROM musubi_edges e JOIN down d ON e.parent = d.id WHERE e.kind = 'data'
)
UPDATE musubi_nodes SET status = 'stale', stale_cause = 'upstream'
WHERE node_id IN (SELECT id FROM down) AND node_id != :root AND status = 'done'
"""

# Early cutoff, atomically: a node stale only because of an upstream comes
# back when every data parent is done with the very artifact it consumed.
_MARK_FRESH = """
UPDATE musubi_nodes SET status = 'done', stale_cause = NULL
WHERE node_id = ? AND status = 'stale' AND stale_cause = 'upstream'
  AND EXISTS (SELECT 1 FROM musubi_edges e WHERE e.child = musubi_nodes.node_id AND e.kind = 'data')
  AND NOT EXISTS (
      SELECT 1 FROM musubi_edges e LEFT JOIN musubi_nodes p ON p.node_id = e.parent
      WHERE e.child = ? AND e.kind = 'data'
        AND (p.status IS NOT 'done' OR e.parent_artifact_id IS NULL
             OR p.artifact_id IS NOT e.parent_artifact_id)
  )
"""

# Inherited connections are parked here after a fork rather than closed:
# closing a connection the parent still uses could drop the parent's locks.
_ABANDONED: list[sqlite3.Connection] = []


def _row_to_node(row: Sequence[Any]) -> NodeRecord:
    return NodeRecord(*row)


_LOOKUP = (
    "SELECT n.node_id, n.op, n.op_name, n.kind, n.step_type, n.input_hash, n.status, "
    "n.artifact_id, a.producer_node_id, n.namespace, n.created_at, n.started_at, "
    "n.finished_at, n.expires_at, n.duration_s, n.tokens_in, n.tokens_out, "
    "n.replay_count, n.exec_count, n.error, n.owner, n.label, n.run_id, "
    "n.stale_cause, n.meta, a.encoding, a.payload "
    "FROM musubi_nodes n LEFT JOIN musubi_artifacts a ON a.artifact_id = n.artifact_id "
    "WHERE n.node_id = ?"
)

# NodeRecord is a frozen dataclass: its __init__ goes through object.__setattr__
# once per field. The lookup hot path fills the slots directly instead (same
# object, about 30% cheaper); it takes the first 25 values of the row (the
# record has no __post_init__ to skip).
_NODE_SLOTS = tuple(NodeRecord.__dict__[f.name].__set__ for f in dataclasses.fields(NodeRecord))
_new_object = object.__new__


def _fast_node(row: Sequence[Any]) -> NodeRecord:
    node: NodeRecord = _new_object(NodeRecord)
    for set_slot, value in zip(_NODE_SLOTS, row, strict=False):  # row may be longer
        set_slot(node, value)
    return node



class SQLiteStore(RunStoreMixin):
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
                    # Statement by statement: executescript() would COMMIT first.
                    for statement in DDL.split(";\n"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.executemany(
                        "INSERT OR IGNORE INTO musubi_meta (key, value) VALUES (?, ?)",
                        [
                            ("app", APP_ID),
                            ("schema_version", str(SCHEMA_VERSION)),
                            ("hash_scheme", "musubi/1"),
                            ("created_at", repr(time.time())),
                        ],
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

    # -- nodes ------------------------------------------------------------------

    def get_node(self, node_id: str) -> NodeRecord | None:
        row = self._read(
            "get_node",
            lambda c: c.execute(
                f"SELECT {NODE_COLUMNS} FROM musubi_nodes n WHERE node_id = ?", (node_id,)
            ).fetchone(),
        )
        return None if row is None else _row_to_node(row)

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

    def get_artifact(self, artifact_id: str) -> tuple[str, bytes] | None:
        row = self._read(
            "get_artifact",
            lambda c: c.execute(
                "SELECT encoding, payload FROM musubi_artifacts WHERE artifact_id = ?",
                (artifact_id,),
            ).fetchone(),
        )
        return None if row is None else (row[0], bytes(row[1]))

    def artifact_producer(self, artifact_id: str) -> str | None:
        row = self._read(
            "artifact_producer",
            lambda c: c.execute(
                "SELECT producer_node_id FROM musubi_artifacts WHERE artifact_id = ?",
                (artifact_id,),
            ).fetchone(),
        )
        return None if row is None else row[0]

    def write(
        self,
        nodes: Sequence[NodeWrite] = (),
        artifacts: Sequence[ArtifactWrite] = (),
        edges: Sequence[EdgeWrite] = (),
    ) -> None:
        if not (nodes or artifacts or edges):
            return
        now = time.time()

        def apply(c: sqlite3.Connection) -> None:
            _write_rows(c, nodes, artifacts, edges, now)

        self._write("write", apply)

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

    def claim(
        self, node: NodeWrite, *, owner_alive: Callable[[NodeRecord], bool], force: bool = False
    ) -> ClaimOutcome:
        now = time.time()

        def apply(c: sqlite3.Connection) -> ClaimOutcome:
            row = c.execute(
                f"SELECT {NODE_COLUMNS} FROM musubi_nodes n WHERE node_id = ?", (node.node_id,)
            ).fetchone()
            current = None if row is None else _row_to_node(row)
            if current is not None:
                if current.status == "done" and not force:
                    return ClaimOutcome("done", current)
                if (
                    current.status == "pending"
                    and current.owner != node.owner
                    and owner_alive(current)
                ):
                    return ClaimOutcome("busy", current)
            _write_rows(c, [node], (), (), now)
            return ClaimOutcome("claimed", current)

        return self._write("claim", apply)

    def add_replays(self, counts: Mapping[str, int], now: float) -> None:
        if not counts:
            return
        rows = [(n, now, node_id) for node_id, n in counts.items()]
        self._write(
            "add_replays",
            lambda c: c.executemany(
                "UPDATE musubi_nodes SET replay_count = replay_count + ?, last_replayed_at = ? "
                "WHERE node_id = ?",
                rows,
            ),
        )

    def invalidate(self, node_id: str) -> int:
        def apply(c: sqlite3.Connection) -> int:
            c.execute(_INVALIDATE, {"root": node_id})
            changed: int = c.execute("SELECT changes()").fetchone()[0]
            return changed

        return self._write("invalidate", apply)

    def mark_fresh(self, node_id: str) -> bool:
        # The parents are re-checked inside the write transaction: if one was
        # invalidated again since the caller looked, nothing changes.
        def apply(c: sqlite3.Connection) -> bool:
            cur = c.execute(_MARK_FRESH, (node_id, node_id))
            return cur.rowcount == 1

        return self._write("mark_fresh", apply)

    def data_parents(self, node_id: str) -> list[ParentState]:
        rows = self._read(
            "data_parents",
            lambda c: c.execute(
                "SELECT e.parent, e.parent_artifact_id, n.status, n.artifact_id "
                "FROM musubi_edges e LEFT JOIN musubi_nodes n ON n.node_id = e.parent "
                "WHERE e.child = ? AND e.kind = 'data'",
                (node_id,),
            ).fetchall(),
        )
        return [ParentState(*row) for row in rows]

    def similar_nodes(self, op_name: str, input_hash: str, limit: int = 5) -> list[NodeRecord]:
        rows = self._read(
            "similar_nodes",
            lambda c: c.execute(
                f"SELECT {NODE_COLUMNS} FROM musubi_nodes n WHERE op_name = ? AND input_hash = ? "
                "ORDER BY created_at DESC LIMIT ?",
                (op_name, input_hash, limit),
            ).fetchall(),
        )
        return [_row_to_node(r) for r in rows]

    def nodes_of_op(self, op_name: str, limit: int = 5) -> list[NodeRecord]:
        rows = self._read(
            "nodes_of_op",
            lambda c: c.execute(
                f"SELECT {NODE_COLUMNS} FROM musubi_nodes n WHERE op_name = ? "
                "ORDER BY op_name, input_hash LIMIT ?",
                (op_name, limit),
            ).fetchall(),
        )
        return [_row_to_node(r) for r in rows]

    def resolve(self, ref: str) -> str:
        ref = ref.strip().lower()
        if not ref or any(ch not in "0123456789abcdef" for ch in ref):
            raise NodeNotFoundError(ref)
        # A range scan on the primary key: no LIKE, so the index is used.
        upper = ref + "g"
        rows = self._read(
            "resolve",
            lambda c: c.execute(
                "SELECT node_id FROM musubi_nodes WHERE node_id >= ? AND node_id < ? LIMIT 6",
                (ref, upper),
            ).fetchall(),
        )
        if len(rows) == 1:
            return str(rows[0][0])
        if not rows:
            raise NodeNotFoundError(ref)
        exact = [r[0] for r in rows if r[0] == ref]
        if exact:
            return str(exact[0])
        raise NodeNotFoundError(ref, candidates=[r[0] for r in rows])

    def edges(self, node_id: str) -> list[EdgeRecord]:
        rows = self._read(
            "edges",
            lambda c: c.execute(
                "SELECT parent, child, kind, parent_artifact_id FROM musubi_edges WHERE parent = ? "
                "UNION ALL "
                "SELECT parent, child, kind, parent_artifact_id FROM musubi_edges WHERE child = ?",
                (node_id, node_id),
            ).fetchall(),
        )
        return [EdgeRecord(*r) for r in rows]

    def lineage(
        self, node_id: str, *, upstream: bool = True, downstream: bool = True, depth: int = 50
    ) -> tuple[list[NodeRecord], list[EdgeRecord]]:
        def walk(c: sqlite3.Connection) -> tuple[list[NodeRecord], list[EdgeRecord]]:
            ids = {node_id}
            edges: dict[tuple[str, str, str], EdgeRecord] = {}
            for direction, enabled in (("up", upstream), ("down", downstream)):
                if not enabled:
                    continue
                frontier = {node_id}
                for _ in range(depth):
                    if not frontier:
                        break
                    marks = ",".join("?" * len(frontier))
                    column, other = ("child", "parent") if direction == "up" else ("parent", "child")
                    rows = c.execute(
                        f"SELECT parent, child, kind, parent_artifact_id FROM musubi_edges "
                        f"WHERE {column} IN ({marks})",
                        tuple(frontier),
                    ).fetchall()
                    nxt = set()
                    for row in rows:
                        edge = EdgeRecord(*row)
                        edges[(edge.parent, edge.child, edge.kind)] = edge
                        target = edge.parent if other == "parent" else edge.child
                        if target not in ids:
                            ids.add(target)
                            nxt.add(target)
                    frontier = nxt
            nodes = []
            for nid in ids:
                row = c.execute(
                    f"SELECT {NODE_COLUMNS} FROM musubi_nodes n WHERE node_id = ?", (nid,)
                ).fetchone()
                if row is not None:
                    nodes.append(_row_to_node(row))
            nodes.sort(key=lambda n: (n.created_at, n.node_id))
            return nodes, list(edges.values())

        return self._read("lineage", walk)

    def list_nodes(
        self, *, limit: int = 50, kind: str | None = None, status: str | None = None
    ) -> list[NodeRecord]:
        clauses, params = [], []
        if kind:
            clauses.append("kind = ?")
            params.append(kind)
        if status:
            clauses.append("status = ?")
            params.append(status)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._read(
            "list_nodes",
            lambda c: c.execute(
                f"SELECT {NODE_COLUMNS} FROM musubi_nodes n {where} "
                "ORDER BY created_at DESC LIMIT ?",
                (*params, limit),
            ).fetchall(),
        )
        return [_row_to_node(r) for r in rows]

    def stats(self) -> dict[str, Any]:
        def gather(c: sqlite3.Connection) -> dict[str, Any]:
            by_kind = c.execute(
                "SELECT kind, COUNT(*), SUM(exec_count), SUM(replay_count), "
                "SUM(replay_count * (COALESCE(tokens_in, 0) + COALESCE(tokens_out, 0))), "
                "SUM(replay_count * COALESCE(duration_s, 0)) "
                "FROM musubi_nodes GROUP BY kind ORDER BY kind"
            ).fetchall()
            statuses = dict(
                c.execute("SELECT status, COUNT(*) FROM musubi_nodes GROUP BY status").fetchall()
            )
            artifacts = c.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM musubi_artifacts"
            ).fetchone()
            runs = c.execute("SELECT COUNT(*) FROM musubi_runs").fetchone()[0]
            kinds = {
                row[0]: {
                    "nodes": row[1],
                    "executions": row[2] or 0,
                    "replays": row[3] or 0,
                    "tokens_saved": row[4] or 0,
                    "seconds_saved": round(row[5] or 0.0, 3),
                }
                for row in by_kind
            }
            return {
                "path": self.path,
                "nodes": sum(k["nodes"] for k in kinds.values()),
                "executions": sum(k["executions"] for k in kinds.values()),
                "replays": sum(k["replays"] for k in kinds.values()),
                "tokens_saved": sum(k["tokens_saved"] for k in kinds.values()),
                "seconds_saved": round(sum(k["seconds_saved"] for k in kinds.values()), 3),
                "statuses": statuses,
                "artifacts": artifacts[0],
                "artifact_bytes": artifacts[1],
                "runs": runs,
                "by_kind": kinds,
            }

        return self._read("stats", gather)

    def gc(self, *, older_than: float | None, now: float) -> dict[str, int]:
        def apply(c: sqlite3.Connection) -> dict[str, int]:
            removed_nodes = 0
            if older_than is not None:
                cutoff = now - older_than
                # Old stale/failed nodes and old nodes nobody replayed recently.
                c.execute(
                    "DELETE FROM musubi_nodes WHERE status IN ('stale', 'failed') AND created_at < ? "
                    "OR (status = 'done' AND COALESCE(last_replayed_at, finished_at, created_at) < ? "
                    # An external effect's record is what stops it from being
                    # issued twice: age never makes it garbage.
                    "    AND run_id IS NULL AND step_type != 'external_effect')",
                    (cutoff, cutoff),
                )
                removed_nodes = c.execute("SELECT changes()").fetchone()[0]
                c.execute(
                    "DELETE FROM musubi_edges WHERE parent NOT IN (SELECT node_id FROM musubi_nodes) "
                    "AND child NOT IN (SELECT node_id FROM musubi_nodes)"
                )
            c.execute(
                "DELETE FROM musubi_artifacts WHERE artifact_id NOT IN "
                "(SELECT artifact_id FROM musubi_nodes WHERE artifact_id IS NOT NULL "
                " UNION SELECT artifact_id FROM musubi_run_steps WHERE artifact_id IS NOT NULL)"
            )
            removed_artifacts = c.execute("SELECT changes()").fetchone()[0]
            return {"nodes": removed_nodes, "artifacts": removed_artifacts}

        return self._write("gc", apply)

    def check(self) -> list[str]:
        def inspect(c: sqlite3.Connection) -> list[str]:
            problems = [r[0] for r in c.execute("PRAGMA integrity_check").fetchall() if r[0] != "ok"]
            missing = c.execute(
                "SELECT COUNT(*) FROM musubi_nodes n WHERE n.status = 'done' AND n.artifact_id IS NOT NULL "
                "AND NOT EXISTS (SELECT 1 FROM musubi_artifacts a WHERE a.artifact_id = n.artifact_id)"
            ).fetchone()[0]
            if missing:
                problems.append(f"{missing} done node(s) point at a missing artifact (they will re-run)")
            pending = c.execute(
                "SELECT COUNT(*) FROM musubi_nodes WHERE status = 'pending'"
            ).fetchone()[0]
            if pending:
                problems.append(
                    f"{pending} node(s) pending: an execution was interrupted (effects may be in doubt)"
                )
            return problems

        return self._read("check", inspect)

    # -- lifecycle ----------------------------------------------------------------

    def close(self) -> None:
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


def _write_rows(
    c: sqlite3.Connection,
    nodes: Sequence[NodeWrite],
    artifacts: Sequence[ArtifactWrite],
    edges: Sequence[EdgeWrite],
    now: float,
) -> None:
    if artifacts:
        c.executemany(
            _INSERT_ARTIFACT,
            [
                (a.artifact_id, a.encoding, a.payload, len(a.payload), a.producer_node_id, now)
                for a in artifacts
            ],
        )
    if nodes:
        changed = _outputs_changed(c, nodes)
        c.executemany(
            _UPSERT_NODE,
            [
                (
                    n.node_id, n.op, n.op_name, n.kind, n.step_type, n.input_hash, n.status,
                    n.artifact_id, n.namespace, now, n.started_at, n.finished_at, n.expires_at,
                    n.duration_s, n.tokens_in, n.tokens_out, n.executed, n.error, n.owner,
                    n.label, n.run_id, n.meta,
                )
                for n in nodes
            ],
        )
        for node_id in changed:
            c.execute(_STALE_DESCENDANTS, {"root": node_id})
    if edges:
        c.executemany(
            _UPSERT_EDGE, [(e.parent, e.child, e.kind, e.parent_artifact_id) for e in edges]
        )


def _outputs_changed(c: sqlite3.Connection, nodes: Sequence[NodeWrite]) -> list[str]:
    """Nodes whose stored output this write replaces with a different one
    (a forced re-execution, an expired TTL). Their data-descendants were
    computed from the old output, so they must go stale."""
    changed = []
    for n in nodes:
        if n.status != "done" or n.artifact_id is None:
            continue
        row = c.execute(
            "SELECT artifact_id FROM musubi_nodes WHERE node_id = ?", (n.node_id,)
        ).fetchone()
        if row is not None and row[0] is not None and row[0] != n.artifact_id:
            changed.append(n.node_id)
    return changed
